import pytest
import torch

from dmq.config import QuantSpec
from dmq.fake_quant import quantize_weight
from dmq.rounding import adaround, gptq, weight_grid

SPECS = [
    QuantSpec("int4", "channel", estimator="mse"),
    QuantSpec("int3", "group", group_size=16, symmetric=False),
    QuantSpec("e2m1", "channel", estimator="fp_bias"),
    QuantSpec("e3m2", "tensor"),
    QuantSpec("nvfp4", "block"),
    QuantSpec("mxfp4", "block"),
]


def _layer(seed: int, o: int = 24, k: int = 64, n: int = 1024, rank: int = 8):
    """A weight and inputs with strongly correlated channels (rank-``rank`` signal plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, k, generator=g) * 0.1
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.05 * torch.randn(n, k, generator=g)
    return w, x


def _out_err(x, w, wq):
    return float((x.double() @ (w.double() - wq.double()).T).pow(2).sum(1).mean())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}")
def test_grid_nearest_is_round_to_nearest_and_neighbours_bracket(spec):
    w, _ = _layer(0)
    grid = weight_grid(w, spec)
    rtn = quantize_weight(w, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)
    assert torch.equal(grid.nearest(w), rtn)
    lo, hi = grid.neighbours(w)
    inside = (lo <= w) & (w <= hi)
    assert bool((inside | (lo == hi)).all())  # saturated elements have one neighbour
    assert bool(((rtn == lo) | (rtn == hi)).all())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}")
def test_adaround_never_worse_than_rtn_and_stays_on_grid(spec, one_thread):
    for seed in (1, 2):
        w, x = _layer(seed)
        grid = weight_grid(w, spec)
        res = adaround(w, x, grid, iters=60)
        rtn = grid.nearest(w)
        # the objective, recomputed independently from the returned weight
        assert _out_err(x, w, res.weight) <= _out_err(x, w, rtn) * (1 + 1e-9)
        assert res.rtn_error == pytest.approx(_out_err(x, w, rtn), rel=1e-6)
        lo, hi = grid.neighbours(w)
        assert bool(((res.weight == lo) | (res.weight == hi)).all())  # every element rounded down or up


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=["int4", "e2m1"])
def test_adaround_improves_on_correlated_inputs(spec, one_thread):
    w, x = _layer(3)
    grid = weight_grid(w, spec)
    res = adaround(w, x, grid, iters=150)
    assert res.error < 0.9 * res.rtn_error


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}")
def test_gptq_beats_rtn_on_correlated_inputs(spec, one_thread):
    w, x = _layer(4)
    grid = weight_grid(w, spec)
    res = gptq(w, x, grid)
    rtn = grid.nearest(w)
    assert _out_err(x, w, res.weight) < 0.5 * _out_err(x, w, rtn)
    assert torch.equal(grid.nearest(res.weight), res.weight)  # on the grid with the fixed scales
