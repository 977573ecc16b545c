"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

The soft weight is ``W~ = lo + h(V) (hi - lo)`` between the grid points below and above each weight, with the
rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (eq. 23). The objective is the layer
output error on cached inputs plus the rounding regulariser ``sum(1 - |2h - 1|^beta)`` with beta annealed from 20
to 2 (eq. 24-25). On an INT grid ``lo, hi`` are ``floor`` and ``ceil``; on minifloat and block grids they are the
neighbouring points of the non-uniform grid (FP4DiT). Scales stay those of round-to-nearest. The hard result is
kept only when its objective is not above round-to-nearest's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmq.rounding.grid import WeightGrid

ZETA, GAMMA = 1.1, -0.1


@dataclass
class RoundingResult:
    """A learned quantized weight with its layer objective and that of round-to-nearest (same grid)."""

    weight: torch.Tensor  # (O, K) on the grid
    error: float  # ||X (W - Wq)^T||^2 / N
    rtn_error: float
    round_up: torch.Tensor | None = None  # bool (O, K) for AdaRound


def layer_error(h: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """``trace(D H D^T)`` with ``D = W - Wq``, ``H = X^T X / N``: the mean squared output error over rows."""
    d = (w - wq).double()
    dh = d @ h.double()
    return float(dh.mul_(d).sum())  # in place: one (O, K) float64 temporary fewer, the same numbers


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def adaround(w: torch.Tensor, x: torch.Tensor, grid: WeightGrid, iters: int = 500, lr: float = 0.1,
             reg_weight: float = 10.0, warmup: float = 0.2) -> RoundingResult:
    """Learned rounding of ``w`` (``(O, K)``) for inputs ``x`` (``(N, K)``) on ``grid``.

    The reconstruction term is the exact full-batch objective ``trace(D H D^T)`` with ``H = X^T X / N`` (one
    ``K x K`` matrix instead of the rows: no sampling noise, and cheaper when ``N > K``), normalised by
    round-to-nearest's value so that ``reg_weight`` means the same for every layer. The strong regulariser
    (10, measured on the bundled models' layers against 0.01..3) hardens the rounding gradually as beta falls.
    """
    w = w.float()
    x = x.float()
    hess = x.T @ x / max(x.shape[0], 1)
    lo, hi = grid.neighbours(w)
    rtn = grid.nearest(w)
    rtn_err = layer_error(hess, w, rtn)
    gap = hi - lo
    movable = gap > 0
    frac = torch.where(movable, (w - lo) / torch.where(movable, gap, 1.0), torch.zeros_like(w))
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    norm = max(rtn_err, 1e-30)
    n_move = max(int(movable.sum()), 1)
    with torch.enable_grad():
        for it in range(iters):
            d = w - (lo + _h(v) * gap)
            loss = ((d @ hess) * d).sum() / norm
            if it >= warmup * iters:
                beta = 20 + (2 - 20) * (it - warmup * iters) / max((1 - warmup) * iters, 1)
                loss = loss + reg_weight * (1 - (2 * _h(v)[movable] - 1).abs().pow(beta)).sum() / n_move
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    up = (_h(v.detach()) >= 0.5) & movable
    hard = torch.where(up, hi, lo)
    err = layer_error(hess, w, hard)
    if err > rtn_err:  # never worse than round-to-nearest on the layer objective
        return RoundingResult(rtn, rtn_err, rtn_err, (rtn == hi) & movable)
    return RoundingResult(hard, err, rtn_err, up)
