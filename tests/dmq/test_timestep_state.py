"""Per-model, per-thread timestep state: concurrent calls equal serial calls bit for bit, two models never see each
other's timestep, the bins follow the timestep convention the model receives (flow models get t/1000), and
per-token, per-frame and list timesteps pick sensible bins."""

from __future__ import annotations

import threading

import torch
from torch import nn

import dmq
from dmq.calibration import CONTEXT, ModelClock, read_timestep
from tests.dmq.helpers import TimeToy, sqnr

CFG = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), act=dmq.QuantSpec("int8", timestep_bins=4), keep_fp=())


class FlowToy(TimeToy):
    """TimeToy fed Flux-style normalised timesteps: ``t`` in [0, 1] means ``1000 t`` on the schedule."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        return super().forward(x, torch.as_tensor(timestep, dtype=x.dtype) * 1000)


def _frozen(cls=TimeToy, timesteps=(100, 400, 600, 900), scale=1.0):
    model = dmq.quantize(cls(), CFG, inplace=False)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    return dmq.freeze(dmq.calibrate(model, lambda m: [m(x, t * scale) for t in timesteps])), x


def test_threaded_calls_are_bit_identical_to_serial_calls():
    model, _ = _frozen()
    gen = torch.Generator().manual_seed(1)
    jobs = [(torch.randn(4, 32, generator=gen), float(t)) for t in torch.linspace(50, 950, 30)]
    with torch.no_grad():
        serial = [model(x, t) for x, t in jobs]
    out: list[torch.Tensor | None] = [None] * len(jobs)
    barrier = threading.Barrier(6)

    def worker(k: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for i in range(k, len(jobs), 6):
                out[i] = model(*jobs[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(a, b) for a, b in zip(serial, out))
    # the bins differ between the jobs, so a shared timestep would have changed outputs
    q = model.lin.input_quantizer
    assert len(set(q.scale.tolist())) == 4


def test_two_models_keep_their_own_timestep_when_nested():
    inner, x = _frozen()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.lin = nn.Linear(32, 32)

        def forward(self, x, timestep):
            return self.lin(self.inner(x, 100.0)) * (1 + torch.as_tensor(timestep) / 100)

    outer = dmq.quantize(Outer(), CFG, include=["lin"])
    dmq.freeze(dmq.calibrate(outer, lambda m: [m(x, t) for t in (100, 900)]))
    seen = []
    inner.lin.register_forward_pre_hook(lambda m, a: seen.append(("inner", CONTEXT.timestep.item())))
    outer.lin.register_forward_pre_hook(lambda m, a: seen.append(("outer", CONTEXT.timestep.item())))
    with torch.no_grad():
        outer(x, 900.0)
    # the outer model's layer runs after the inner model returned, at the outer call's timestep again
    assert seen == [("inner", 100.0), ("outer", 900.0)] and CONTEXT.timestep is None


def test_flow_model_bins_follow_normalised_timesteps():
    model, x = _frozen(FlowToy, scale=1e-3)  # the model is called with t / 1000
    q = model.lin.input_quantizer
    assert model._dmq.clock.range == (0.0, 1.0) and q.timestep_range == (0.0, 1.0)
    assert (q.scale[1:] > q.scale[:-1]).all()  # four distinct bins were observed, in order
    seen = []
    model.lin.register_forward_pre_hook(lambda m, a: seen.append(int(q.current_bins(a[0].shape[0]))))
    ref = FlowToy()
    with torch.no_grad():
        good = [sqnr(ref(x, t), model(x, t)) for t in (0.1, 0.4, 0.6, 0.9)]
        q.timestep_range = (0.0, 1000.0)  # bins laid on the scheduler's range: every call lands in bin 0
        one_bin = sqnr(ref(x, 0.9), model(x, 0.9))
    assert seen == [0, 1, 2, 3, 0] and min(good) > 35
    assert one_bin < good[3] - 10  # bin 0's narrow scale clips the t = 0.9 activations
    # and it survives save / load
    raw, _ = _frozen(TimeToy)
    assert raw._dmq.clock.range == (0.0, 1000.0) and raw.lin.input_quantizer.timestep_range == (0.0, 1000.0)


def test_flow_range_is_saved(tmp_path):
    model, x = _frozen(FlowToy, scale=1e-3)
    dmq.save(model, tmp_path / "m.safetensors")
    loaded = dmq.load(FlowToy(), tmp_path / "m.safetensors")
    assert loaded.lin.input_quantizer.timestep_range == (0.0, 1.0)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.9), model(x, 0.9)) and torch.equal(loaded(x, 0.1), model(x, 0.1))


def test_per_token_per_frame_and_list_timesteps():
    assert read_timestep(torch.tensor(5)).shape == (1, 1)
    assert read_timestep(torch.tensor([5.0, 7.0])).shape == (2, 1)
    assert read_timestep(torch.zeros(2, 6)).shape == (2, 6)  # per token (Wan 2.2 TI2V)
    assert read_timestep([torch.tensor([3.0]), torch.tensor([9.0])]).tolist() == [[3.0, 9.0]]  # a list
    assert read_timestep([torch.ones(2), torch.zeros(3)]).shape == (1, 5)  # ragged: one set
    assert read_timestep(torch.tensor([1, 2])).dtype == torch.float64  # DDPM's integer timesteps
    assert read_timestep("text") is None and read_timestep([]) is None  # not a timestep
    model, x = _frozen()
    q = model.lin.input_quantizer
    seen = []
    model.lin.register_forward_pre_hook(lambda m, a: seen.append(q.current_bins(a[0].shape[0]).tolist()))

    class PerToken(nn.Module):  # calls the quantized model with a per-token timestep; the noisiest token decides
        def forward(self, x, t):
            return model.lin(x)

    with torch.no_grad():
        tok = torch.tensor([[0.0, 950.0, 950.0], [0.0, 120.0, 120.0]])
        from dmq.calibration import call_scope
        with call_scope(calibrating=False, timestep=read_timestep(tok)):
            model.lin(x[:2])
            model.lin(x[:6].reshape(6, 32))  # (batch x 3 frames) rows, batch-major
    assert seen == [[3, 0], [3, 3, 3, 0, 0, 0]]


def test_clock_copies_and_pickles_without_its_lock():
    import copy
    import pickle

    c = ModelClock(0, 1000)
    c.see(torch.tensor([[0.5]]))
    for d in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert d.range == (0.0, 1.0) and d.latched and d.lock is not c.lock


def test_layer_calibration_never_reached_falls_back_to_dynamic(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x, timestep, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = dmq.quantize(Branchy(), CFG)
    x = torch.randn(4, 16)
    with caplog.at_level("WARNING"):
        dmq.freeze(dmq.calibrate(model, lambda m: m(x, 500.0)))
    assert model._dmq.unobserved == ["b.input_quantizer"] and "quantize dynamically" in caplog.text
    q = model.b.input_quantizer
    assert q.spec.dynamic and q.frozen
    with torch.no_grad():
        out = model(x, 500.0, use_b=True)
    w = model.b.dequantized_weight()
    scale = x.abs().max() / 127
    expect = torch.nn.functional.linear((x / scale).round().clamp(-128, 127) * scale, w, model.b.bias)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
    # without any calibration call it is still an error
    fresh = dmq.quantize(Branchy(), CFG)
    try:
        dmq.freeze(fresh)
    except dmq.NotCalibratedError:
        pass
    else:
        raise AssertionError("freeze without calibration must raise")
