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


def _gptq_reference(w, x, grid, damp=0.01, block=128):
    """GPTQ as written out in the paper (Frantar et al., Algorithm 1 with act-order and lazy block updates), every
    step out of place, the Hessian kept throughout."""
    from dmq.rounding.adaround import layer_error
    from dmq.rounding.grid import WeightGrid

    hess = x.double().T @ x.double() / x.shape[0]
    d = torch.diag(hess).clone()
    dead = d == 0
    d[dead] = 1.0
    d += damp * d.mean()
    perm = torch.argsort(d, descending=True)
    h = hess[perm][:, perm]
    h.diagonal().copy_(d[perm])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pgrid = WeightGrid(grid.scale[:, perm], grid.zero[:, perm], grid.values)
    wp = w.double()[:, perm].clone()
    wp[:, dead[perm]] = 0.0
    q = torch.zeros_like(wp)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1 = wp[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            q[:, i1 + i] = pgrid.nearest(w1[:, i:i + 1].float(), slice(i1 + i, i1 + i + 1))[:, 0].double()
            e = (w1[:, i] - q[:, i1 + i]) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= e[:, None] * hinv[i1 + i, i1 + i:i2][None, :]
            err1[:, i] = e
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = q[:, torch.argsort(perm)].float()
    rtn = grid.nearest(w)
    return (out, layer_error(hess, w, out)) if layer_error(hess, w, out) <= layer_error(hess, w, rtn) else \
        (rtn, layer_error(hess, w, rtn))


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[-2:], ids=lambda s: f"{s.format}-{s.granularity}")
def test_gptq_in_place_is_the_out_of_place_algorithm_bit_for_bit(spec, one_thread):
    """The factorisation in place and the Hessian built twice (two K x K matrices live, not three) change no bit."""
    w, x = _layer(5, k=300, n=200)  # three column blocks, the last one short
    x[:, 7] = 0.0  # a dead input channel
    grid = weight_grid(w, spec)
    res = gptq(w, x, grid)
    ref, err = _gptq_reference(w, x, grid)
    assert torch.equal(res.weight, ref) and res.error == err


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}")
def test_grid_rounds_a_whole_weight_by_row_chunks_bit_for_bit(spec, monkeypatch):
    import dmq.rounding.grid as grid_module

    w, _ = _layer(6, o=37, k=64)
    grid = weight_grid(w, spec)
    whole = grid.nearest(w)
    monkeypatch.setattr(grid_module, "CHUNK", 5 * 64)  # 5 rows a chunk: 8 chunks, the last one short
    assert torch.equal(grid.nearest(w), whole)
