import logging

import pytest
import torch

import dmq
from dmq.calibration import CONTEXT, NormalSteps, UniformSteps, timestep_bins
from tests.dmq.helpers import TimeToy, sqnr

CFG = dmq.QuantConfig(weight=None, act=dmq.QuantSpec("int8", timestep_bins=4), keep_fp=())


def _calibrated(timesteps=(100, 400, 600, 900)):
    model = dmq.quantize(TimeToy(), CFG, inplace=False)
    x = torch.randn(8, 32)
    return dmq.freeze(dmq.calibrate(model, lambda m: [m(x, t) for t in timesteps])), x


def test_bins_split_the_range_evenly():
    t = torch.tensor([0.0, 249.9, 250.0, 999.0, 1000.0, -5.0])
    assert timestep_bins(t, 4, 0, 1000).tolist() == [0, 0, 1, 3, 3, 0]


def test_timestep_bins_really_switch():
    model, x = _calibrated()
    q = model.lin.input_quantizer
    # activations grow with t, so must the per-bin scales
    assert (q.scale[1:] > q.scale[:-1]).all()
    with torch.no_grad():
        ref = TimeToy()(x, 100)
        good = model(x, 100)
        # the same call labelled with a late timestep uses the wide bin: a coarser grid, more error
        q.scale[0] = q.scale[3]
        worse = model(x, 100)
    assert sqnr(ref, good) > 35 and sqnr(ref, good) > sqnr(ref, worse) + 6
    model, x = _calibrated()
    # per-sample timesteps: two samples, two bins, each gets its own scale
    with torch.no_grad():
        t = torch.tensor([100.0, 900.0])
        mixed = model(x[:2], t)
        sep = torch.cat([model(x[:1], 100.0), model(x[1:2], 900.0)])
    assert torch.allclose(mixed, sep, atol=1e-5)


def test_active_bin_comes_from_keyword_or_positional_timestep():
    model, x = _calibrated()
    seen = []
    q = model.lin.input_quantizer
    q.register_forward_pre_hook(lambda m, a: seen.append(m.current_bins(a[0].shape[0]).tolist()))
    with torch.no_grad():
        model(x, 950)
        model(x, timestep=torch.tensor(120))
        model(x, torch.full((8,), 600.0))
    assert seen == [[3], [0], [2] * 8]  # one bin per sample (branch-free: no collapse of equal bins)
    assert CONTEXT.timestep is None  # cleared after each call


def test_calibration_reads_true_timestep_not_call_index():
    model = dmq.quantize(TimeToy(), CFG, inplace=False)
    x = torch.randn(8, 32)
    dmq.calibrate(model, lambda m: [m(x, 900), m(x, 900)])  # two calls, both in the last bin
    assert model.lin.input_quantizer.observer.observed_bins() == [3]


def test_uniform_policy_takes_one_call_per_window_per_run():
    model = dmq.quantize(TimeToy(), CFG, inplace=False)
    x = torch.randn(2, 32)
    run = list(range(999, -1, -50))  # 20 steps, two runs
    dmq.calibrate(model, lambda m: [m(x, t) for _ in range(2) for t in run], steps=UniformSteps(5))
    assert model._dmq.calibration_points == 10


def test_normal_policy_prefers_mu_and_is_reproducible():
    pol = NormalSteps(mu=0.2, sigma=0.1, seed=3)
    def take(p):
        p.reset()
        return [t for t in range(0, 1000, 5) if p.accept(torch.tensor([float(t)]), 0, 1000)]
    a, b = take(pol), take(pol)
    assert a == b and len(a) > 5
    near = sum(100 <= t <= 300 for t in a)
    assert near / len(a) > 0.6


def test_unknown_policy():
    with pytest.raises(ValueError, match="all, uniform, normal"):
        dmq.calibrate(dmq.quantize(TimeToy(), CFG, inplace=False), lambda m: None, steps="cosine")


def test_nan_inf_skipped_with_counting_warning(caplog):
    model = dmq.quantize(TimeToy(), CFG, inplace=False)
    x = torch.randn(4, 32)
    x[0, 0], x[1, 1] = float("nan"), float("inf")
    dmq.calibrate(model, lambda m: m(x, 10))
    with caplog.at_level(logging.WARNING, logger="dmq"):
        dmq.freeze(model)
    assert any("skipped 2 non-finite" in r.message for r in caplog.records)
    assert torch.isfinite(model.lin.input_quantizer.scale).all()


def test_memory_does_not_grow_with_calibration_points():
    model = dmq.quantize(TimeToy(), dmq.QuantConfig(weight=None, act=dmq.QuantSpec("int8", estimator="mse",
                                                                                        timestep_bins=4)))
    x = torch.randn(4, 32)
    dmq.calibrate(model, lambda m: [m(x * (1 + i), i) for i in range(0, 1000, 100)])
    size = dmq.summary(model)["observer_bytes"]
    dmq.calibrate(model, lambda m: [m(x * 50, i % 1000) for i in range(0, 5000, 7)])
    assert dmq.summary(model)["observer_bytes"] == size


class _KeywordInputs(torch.nn.Module):
    """Layers called with ``input=`` (as AnimateDiff's motion modules call ``proj_in``) or positionally."""

    def __init__(self, keyword: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.keyword = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), keyword

    def forward(self, x, timestep):
        if self.keyword:
            return self.b(input=torch.relu(self.a(input=x)))
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method", [{"rounding": "gptq"}, {"smooth": 0.5}, {"memory_budget": 7.0}])
def test_layers_called_with_input_keyword_calibrate_as_positional(method, one_thread):
    """The hooks that read a layer's input (GPTQ's cache, SmoothQuant's statistics, the budget's second moments)
    see ``input=`` calls too: the quantized model equals the one called positionally, bit for bit."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    cfg = dmq.get_config("w4a8").replace(keep_fp=(), **method)
    outs = []
    for keyword in (True, False):
        model = dmq.quantize(_KeywordInputs(keyword), cfg)
        dmq.freeze(dmq.calibrate(model, lambda m: [m(x, t) for t in (100, 700)]))
        with torch.no_grad():
            outs.append(model(x, 300))
    assert torch.equal(outs[0], outs[1]) and sqnr(_KeywordInputs(False)(x, 300).detach(), outs[0]) > 15
