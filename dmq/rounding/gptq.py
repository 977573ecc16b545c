"""GPTQ (Frantar et al., 2023): quantize a weight column by column and spread each column's error over the columns
not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer objective (OBS update, eq. 3-5, with
the Cholesky form of the inverse and lazy block updates). Columns go in decreasing ``diag(H)`` order (act-order).
The grid (INT, minifloat or block format) keeps round-to-nearest's scales, so any format works.
"""

from __future__ import annotations

import torch

from dmq.rounding.adaround import RoundingResult, layer_error
from dmq.rounding.grid import WeightGrid


def gptq(w: torch.Tensor, x: torch.Tensor, grid: WeightGrid, damp: float = 0.01, block: int = 128,
         act_order: bool = True) -> RoundingResult:
    """GPTQ-rounded ``w`` (``(O, K)``) for inputs ``x`` (``(N, K)``); kept only if its objective is not above
    round-to-nearest's."""
    w = w.float()
    hess = _hessian(x)
    rtn = grid.nearest(w)
    rtn_err = layer_error(hess, w, rtn)
    k = w.shape[1]
    # K x K float64 matrices are the working set (170 MB each at K = 4608). Two live at once: the factor, permuted,
    # damped, factored and inverted in place, and torch's temporary of each step. The Hessian is built again for
    # the final error rather than kept beside them (the same product: the same numbers, bit for bit)
    d = torch.diag(hess).clone()
    dead = d == 0
    d[dead] = 1.0
    d += damp * d.mean()  # the damped diagonal
    perm = torch.argsort(d, descending=True) if act_order else torch.arange(k)
    inv = torch.argsort(perm)
    hinv = _permuted(hess, perm)
    del hess
    hinv.diagonal().copy_(d[perm])
    torch.linalg.cholesky(hinv, out=hinv)
    torch.cholesky_inverse(hinv, out=hinv)
    torch.linalg.cholesky(hinv, upper=True, out=hinv)
    wp = w.double()[:, perm]  # indexing copies
    wp[:, dead[perm]] = 0.0
    q = _columns(wp, hinv, grid, perm, block)
    del hinv, wp
    out = q[:, inv]
    del q
    err = layer_error(_hessian(x), w, out)
    if err > rtn_err:
        return RoundingResult(rtn, rtn_err, rtn_err)
    return RoundingResult(out, err, rtn_err)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X / N`` in float64."""
    xd = x.double()
    return (xd.T @ xd).div_(max(x.shape[0], 1))


def _permuted(h: torch.Tensor, perm: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``h[perm][:, perm]``, a few rows at a time (one index over both axes would build two K x K index
    tensors; two steps would hold a third K x K matrix)."""
    out = torch.empty_like(h)
    for r0 in range(0, h.shape[0], rows):
        torch.index_select(h.index_select(0, perm[r0:r0 + rows]), 1, perm, out=out[r0:r0 + rows])
    return out


def _columns(wp: torch.Tensor, hinv: torch.Tensor, grid: WeightGrid, perm: torch.Tensor, block: int
             ) -> torch.Tensor:
    """The column loop of GPTQ (Frantar et al., Algorithm 1) on the permuted float64 weight ``wp``, updated in
    place, with the upper Cholesky factor ``hinv`` of the inverse Hessian; returns the quantized columns (float32,
    exactly: the grid's values are float32). Column ``i`` is rounded on the grid's column ``perm[i]``, read in
    place rather than from a permuted copy of the grid."""
    k = wp.shape[1]
    q = torch.zeros(wp.shape, dtype=torch.float32)
    cols = perm.tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            c = cols[i1 + i]
            qc = grid.nearest(col[:, None].float(), slice(c, c + 1))[:, 0]
            q[:, i1 + i] = qc
            e = (col - qc.double()) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q
