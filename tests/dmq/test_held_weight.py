"""A quantized layer holds its fake-quantized weight packed, once built (dmq.held_weight): bit for bit the
round-to-nearest weight, built row chunk by row chunk; freeze keeps those tensors; calibrate copies no weight
unless a transform folds into the float weights, and a failed calibration still rolls back exactly."""

import gc
import weakref

import diffusers
import pytest
import torch

import dmq
import dmq.held_weight as hw
import dmq.transaction as tx
from dmq import kernels
from dmq.config import QuantSpec, get_config
from dmq.fake_quant import quantize_weight
from dmq.packed import pack_weight
from dmq.packed_weight import PackedWeight
from tests.dmq.helpers import backbone_loop, tiny_dit

SPECS = [get_config(p).weight for p in ("w4a16", "nvfp4", "mxfp4", "w8a8")] + [
    QuantSpec("int4", "group", 16), QuantSpec("int4", "group", 16, symmetric=False), QuantSpec("int8", "tensor")]


def _weight(rows=40, cols=48):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    w[:3] *= 1e-5  # group scales below float16's normal range in the first rows: float32 scales there
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{s.symmetric}")
def test_chunked_held_weight_is_the_whole_layer_rtn_bit_for_bit(spec, monkeypatch):
    w = _weight()
    ref = quantize_weight(w, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)
    whole_t, whole_lay = pack_weight(w, spec, ref)
    monkeypatch.setattr(hw, "CHUNK", 7 * 48)  # 7 rows a chunk: 6 chunks, the last one short
    held = hw.held(w, spec)
    assert isinstance(held, PackedWeight) and held.dtype == torch.bfloat16
    assert torch.equal(hw.dense(held), ref)
    # the same layout and tensors as packing the whole layer at once: one scale dtype, one NVFP4 tensor scale
    assert held.layouts == (whole_lay,)
    assert set(held.tensors()) == set(whole_t) and all(torch.equal(held.tensors()[k], whole_t[k]) for k in whole_t)


def test_off_grid_values_are_held_as_they_are():
    w, spec = _weight(), QuantSpec("int4", "channel")
    assert hw.held(w, spec, target=w) is w  # a reference run's float weight: not on the grid, kept dense
    assert hw.held(w, None) is not w and hw.held(w, None).data_ptr() == w.data_ptr()  # no format: an alias


def _bytes(t: torch.Tensor) -> int:
    return t.packed_nbytes if isinstance(t, PackedWeight) else t.numel() * t.element_size()


def test_quantized_model_holds_a_quarter_not_a_copy_and_freeze_keeps_the_codes(monkeypatch):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(  # tiny_dit, 64 wide: groups of 32 fill every row
        num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).to(torch.bfloat16).eval()
    dmq.quantize(model, dmq.get_config("w4a16").replace(rounding="rtn", per_sample_rounding="rtn"))
    layers = [model.get_submodule(n) for n in model._dmq.modules]
    held = sum(_bytes(m.weight_fq) for m in layers)
    floats = sum(_bytes(m.weight) for m in layers)
    assert all(isinstance(m.weight_fq, PackedWeight) for m in layers)
    assert held < 0.3 * floats  # INT4 codes plus float16 group scales: 4.5 of 16 bits
    codes = {n: m.weight_fq.qweight.data_ptr() for n, m in zip(model._dmq.modules, layers)}
    originals, alive = [weakref.ref(m.weight) for m in layers], []

    def prepare(layer):  # kernel state (here int4pack copies) is built once the float weights are gone
        gc.collect()
        alive.append(sum(r() is not None for r in originals))
        real(layer)

    real = kernels.prepare
    monkeypatch.setattr(kernels, "prepare", prepare)
    x, y = torch.randn(2, 1, 8, 8).to(torch.bfloat16), torch.tensor([1, 2])
    dmq.freeze(dmq.calibrate(model, lambda m: [m(x, torch.full((2,), t), class_labels=y) for t in (900.0, 100.0)]))
    assert {n: model.get_submodule(n).weight.qweight.data_ptr() for n in codes} == codes  # no repack, no copy
    assert alive and not any(alive)


def _snapshot_clones(monkeypatch) -> list[int]:
    """Bytes of parameters and buffers each transaction's snapshot copies (all sizes: SMALL is 0; observer
    statistics are not counted)."""
    made = []
    init = tx.Snapshot.__init__

    def spy(self, *roots, **kw):
        init(self, *roots, **kw)
        made.append(sum(_bytes(k) for name, _, _, k in self._tensors if k is not None and ":" in name))

    monkeypatch.setattr(tx, "SMALL", 0)
    monkeypatch.setattr(tx.Snapshot, "__init__", spy)
    return made


@pytest.mark.parametrize("name, copies", [("w4a16", False), ("w8a8", False), ("w4a8+smooth0.5", True)])
def test_calibrate_copies_weights_only_for_transforms_that_fold(name, copies, monkeypatch, one_thread):
    model = dmq.quantize(tiny_dit(), name)
    made = _snapshot_clones(monkeypatch)
    dmq.calibrate(model, backbone_loop(model, [900, 100]))
    weights = sum(_bytes(model.get_submodule(n).weight) for n in model._dmq.modules)
    assert len(made) == 1
    assert (made[0] >= weights) if copies else made[0] < 0.05 * weights  # learned rounding replaces weight_fq


class Boom(Exception):
    pass


@pytest.mark.parametrize("name", ["w4a16", "w8a8"])  # GPTQ everywhere; GPTQ on the per-sample layers only
def test_a_calibration_failing_after_learned_rounding_rolls_back_exactly(name, monkeypatch, one_thread):
    import dmq.rounding as rounding

    model = dmq.quantize(tiny_dit(), name)
    loop = backbone_loop(model, [900, 100])
    before = {k: hw.dense(v).clone() for k, v in model.state_dict(keep_vars=True).items()}
    fq = {n: hw.dense(model.get_submodule(n).weight_fq).clone() for n in model._dmq.modules}
    real, calls = rounding.gptq, []

    def gptq_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Boom  # two layers already hold their GPTQ weights
        return real(*a, **k)

    monkeypatch.setattr(rounding, "gptq", gptq_then_fail)
    with pytest.raises(Boom) as err:
        dmq.calibrate(model, loop)
    assert not getattr(err.value, "__notes__", None)  # nothing changed in place that a rollback could not restore
    assert len(calls) == 3
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before) and all(torch.equal(hw.dense(after[k]), before[k]) for k in before)
    assert all(torch.equal(hw.dense(model.get_submodule(n).weight_fq), fq[n]) for n in fq)
    assert dmq.summary(model)["calibration_points"] == 0
    monkeypatch.setattr(rounding, "gptq", real)
    dmq.calibrate(model, loop)  # and it calibrates normally afterwards
    assert dmq.summary(model)["methods"]["error_vs_rtn"]
