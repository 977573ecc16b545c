"""The quantization grid of one weight, with its scales fixed: the two grid points around every element.

Learned rounding (AdaRound, GPTQ) keeps the scales that round-to-nearest chose (the same min-max / MSE-clipping /
exponent-bias search as :func:`dmq.fake_quant.quantize_weight`) and only decides, per element, between the grid
point below and the one above. On an INT grid they are ``floor`` and ``ceil`` of ``w / s``; on a minifloat or block
format the grid is non-uniform and the neighbours come from the sorted grid values (FP4DiT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmq.config import QuantSpec
from dmq.fake_quant import ungrouped, weight_qparams
from dmq.formats.block import MXFormat, NVFP4Format, _pow2, _to_blocks

CHUNK = 1 << 18  # elements per row chunk of a whole-weight rounding


@dataclass
class WeightGrid:
    """Per-element affine map and grid of a weight seen as ``(O, K)`` rows.

    ``q(w) = (G(w / scale + zero) - zero) * scale`` with ``G`` rounding onto ``values`` (sorted, unscaled).
    """

    scale: torch.Tensor  # (O, K)
    zero: torch.Tensor  # (O, K)
    values: torch.Tensor  # (V,) sorted grid points of the element format

    def to_unit(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.scale + self.zero

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.zero) * self.scale

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid points just below and just above each element (equal when ``w`` saturates or is on the grid),
        in weight units."""
        u = self.to_unit(w).clamp(float(self.values[0]), float(self.values[-1]))
        v = self.values.to(u)
        hi_idx = torch.searchsorted(v, u.contiguous()).clamp_(0, v.numel() - 1)
        lo_idx = torch.where(v[hi_idx] > u, hi_idx - 1, hi_idx).clamp_(0, v.numel() - 1)
        return self.from_unit(v[lo_idx]), self.from_unit(v[hi_idx])

    def nearest(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Round-to-nearest on this fixed grid (columns ``cols`` of the affine map when ``w`` is a column block).
        A whole weight goes a few rows at a time: the search works in int64, 40 bytes per element."""
        if cols is None and w.numel() > CHUNK and w.shape[0] > 1:
            rows = max(1, CHUNK // w.shape[1])
            return torch.cat([WeightGrid(self.scale[r:r + rows], self.zero[r:r + rows], self.values)
                              .nearest(w[r:r + rows]) for r in range(0, w.shape[0], rows)])
        s, z = (self.scale, self.zero) if cols is None else (self.scale[:, cols], self.zero[:, cols])
        u = (w / s + z).clamp(float(self.values[0]), float(self.values[-1]))
        v = self.values.to(u)
        hi_idx = torch.searchsorted(v, u.contiguous()).clamp_(0, v.numel() - 1)
        lo_idx = (hi_idx - 1).clamp_(min=0)
        lo, hi = v[lo_idx], v[hi_idx]
        pick = torch.where((u - lo) < (hi - u), lo, hi)
        return (pick - z) * s


def _element_grid(rows: torch.Tensor, spec: QuantSpec) -> WeightGrid:
    # the scales of round-to-nearest (dmq.fake_quant.weight_qparams), so a learned weight packs on the same grid
    fmt = spec.fmt
    g, scale, zp = weight_qparams(rows, fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)
    zp = torch.zeros_like(scale) if zp is None else zp
    full = torch.ones_like(g)
    return WeightGrid(ungrouped(scale * full, rows.shape), ungrouped(zp * full, rows.shape),
                      fmt.values().to(torch.float32))


def _block_grid(rows: torch.Tensor, fmt: MXFormat | NVFP4Format) -> WeightGrid:
    w, n = _to_blocks(rows, -1, fmt.block_size)
    if isinstance(fmt, MXFormat):
        scale = _pow2(fmt._exponents(w), w.dtype)
    else:
        s_t, s_b = fmt._scales(w, None)
        scale = s_b * s_t if s_t > 0 else torch.ones_like(s_b)
    scale = (scale * torch.ones_like(w)).reshape(rows.shape[0], -1)[:, :n]
    return WeightGrid(scale, torch.zeros_like(scale), fmt.element.values().to(torch.float32))


def weight_grid(w: torch.Tensor, spec: QuantSpec, split: int | None = None) -> WeightGrid:
    """The fixed grid of ``w`` (``(O, ...)``, flattened to ``(O, K)``) under ``spec``; ``split`` = input channels of
    the first half of a shortcut-split convolution, whose two halves have their own scales."""
    rows = w.detach().reshape(w.shape[0], -1).float()
    if split is not None:
        cut = split * (rows.shape[1] // w.shape[1])
        a, b = weight_grid(rows[:, :cut], spec), weight_grid(rows[:, cut:], spec)
        return WeightGrid(torch.cat([a.scale, b.scale], 1), torch.cat([a.zero, b.zero], 1), a.values)
    fmt = spec.fmt
    if fmt.is_block:
        return _block_grid(rows, fmt)
    return _element_grid(rows, spec)
