"""The eager shortcuts of frozen models are the computation they replace, bit for bit: a dynamic quantizer's result
shared by the layers that read one tensor (``dmq.memo.InputMemo``: invalidated by an in-place change, dropped with
its input, off under ``dmq.kernels.disable("input_memo")``), and a static quantizer's per-call bin and dtype scale
(every sample in one bin, mixed bins, no timestep, a batch the timesteps do not divide)."""

from __future__ import annotations

import gc

import pytest
import torch

import dmq
from dmq import kernels
from dmq.calibration import call_scope
from dmq.config import QuantSpec
from dmq.memo import InputMemo
from dmq.quantizer import TensorQuantizer
from tests.dmq.helpers import tiny_dit


def test_memo_reuses_until_the_input_changes_or_dies():
    memo, calls = InputMemo(), []

    def fn(t):
        calls.append(1)
        return t * 2

    x = torch.arange(6.0)
    a = memo.get(x, "k", fn)
    assert memo.get(x, "k", fn) is a and len(calls) == 1
    assert memo.get(x, "other key", fn) is not a and len(calls) == 2
    assert memo.get(x.clone(), "other key", fn) is not None and len(calls) == 3  # another tensor, same values
    x.add_(1)  # in place: the version counter moves
    assert torch.equal(memo.get(x, "k", fn), (torch.arange(6.0) + 1) * 2) and len(calls) == 4
    with kernels.disable("input_memo"):
        memo.get(x, "k", fn)
        assert len(calls) == 5
    del x
    gc.collect()
    assert memo._entry is None  # the result does not outlive its input
    y = torch.ones(3, requires_grad=True)
    memo.get(y, "k", fn)
    memo.get(y, "k", fn)
    assert len(calls) == 7  # a tensor that needs a gradient is never shared
    with torch.inference_mode():
        z = torch.ones(3)
        memo.get(z, "k", fn)
        memo.get(z, "k", fn)
    assert len(calls) == 9  # nor an inference tensor (no version counter)


@pytest.mark.parametrize("preset", ["nvfp4", "w4a8-fp"])
def test_shared_dynamic_quantization_is_bit_identical(preset):
    model = tiny_dit().to(torch.bfloat16)
    q = dmq.quantize(model, preset)
    dmq.freeze(q)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g).to(torch.bfloat16)
    args = (x, torch.tensor([10.0, 500.0, 900.0]))
    with torch.no_grad():
        out = q(*args, class_labels=torch.tensor([1, 2, 3])).sample
        with kernels.disable("input_memo"):
            ref = q(*args, class_labels=torch.tensor([1, 2, 3])).sample
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def _static_quantizer(fmt: str, symmetric: bool) -> TensorQuantizer:
    q = TensorQuantizer(QuantSpec(fmt, "tensor", symmetric=symmetric, timestep_bins=4))
    scale = torch.tensor([0.011, 0.023, 0.047, 0.09])
    zp = torch.zeros(4) if symmetric else torch.tensor([3.0, 100.0, 128.0, 200.0])
    q.freeze((scale, zp))
    return q


@pytest.mark.parametrize("fmt,symmetric", [("e4m3", True), ("uint8", False), ("int8", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_static_bin_shortcut_is_the_per_sample_computation(fmt, symmetric, dtype):
    q = _static_quantizer(fmt, symmetric)
    x = (torch.randn(4, 5, 33, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)

    def reference(t):
        scale, zp = q.static_params(x)
        return dmq.fake_quant.fake_quant(x, q.fmt, scale, zp)

    cases = [torch.full((4,), 600.0), torch.tensor([100.0, 300.0, 600.0, 900.0]), torch.tensor([600.0]),
             torch.full((3,), 600.0)]  # one bin; mixed bins; one timestep; 3 timesteps for a batch of 4
    for t in cases:
        with call_scope(calibrating=False, timestep=t):
            assert torch.equal(q(x), reference(t))
    assert q.single_bin(4) is None  # no timestep: the widest bin, through static_params
    with call_scope(calibrating=False, timestep=torch.full((3,), 600.0)):
        assert q.single_bin(3) == 2 and q.single_bin(4) is None


def test_static_bin_params_follow_a_reload():
    q = _static_quantizer("e4m3", True)
    x = torch.randn(2, 16).to(torch.bfloat16)
    with call_scope(calibrating=False, timestep=torch.full((2,), 100.0)):
        first = q(x)
        q.scale.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))  # load_state_dict copies in place
        again = q(x)
        scale, _ = q.static_params(x)
        assert torch.equal(again, dmq.fake_quant.fake_quant(x, q.fmt, scale, None))
        assert not torch.equal(first, again)


def test_static_bin_params_follow_a_reload_of_inference_tensors():
    """Buffers made under inference mode have no version counter: an in-place load there is still seen."""
    with torch.inference_mode():
        q = _static_quantizer("e4m3", True)
        x = torch.randn(2, 16).to(torch.bfloat16)
        with call_scope(calibrating=False, timestep=torch.full((2,), 100.0)):
            first = q(x)
            q.scale.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))
            again = q(x)
            scale, _ = q.static_params(x)
    assert torch.equal(again, dmq.fake_quant.fake_quant(x, q.fmt, scale, None))
    assert not torch.equal(first, again)
