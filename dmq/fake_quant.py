"""Scaled fake quantization on top of :mod:`dmq.formats`: ranges to (scale, zero point), granularity views, and the
static weight range search (min-max, MSE clipping, FP exponent-bias search).

Every tensor is seen as rows ``(R, K)`` with the reduction dimension last (weights: one row per output channel;
activations: one row per token or pixel). A granularity groups each row: ``tensor`` = one group over everything,
``channel``/``token`` = one group per row, ``group`` = ``group_size`` consecutive elements of a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmq import formats
from dmq.formats.grid import abs_amax, every16, lookup16, round_div16

# formats whose fake quantization is torch's own float8 cast (after saturating to the format's max)
NATIVE_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# candidate clipping ratios of the range searches
MSE_RATIOS = torch.linspace(1.0, 0.3, 36).tolist()
# LLM-FP4: exponent-bias offsets db >= 0 shrink the FP grid by 2^-db (db = 0: the grid's max meets the range)
FP_BIAS_OFFSETS = torch.linspace(0.0, 3.0, 49).tolist()


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: formats.Format, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point for asymmetric INT) that map ``[lo, hi]`` onto the grid of ``fmt``.

    Symmetric: ``scale = max(|lo|, |hi|) / fmt.max``. Asymmetric (unsigned INT grid ``[0, qmax]``): the range is
    widened to contain 0, ``scale = (hi - lo) / qmax``, ``zero_point = round(-lo / scale)``. A zero range gets
    scale 1.
    """
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / fmt.max
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / fmt.max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = (-lo / scale).round_().clamp_(0, fmt.max)
    return scale, zp


def fake_quant(
    x: torch.Tensor, fmt: formats.Format, scale: torch.Tensor, zp: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * Q(x / scale)`` (symmetric) or ``scale * (Q(x / scale + zp) - zp)`` on the grid of ``fmt``.

    INT grids take a shortcut with the same result bit for bit: round half to even then clamp, in ``x``'s dtype
    (integers up to 255 are exact in every float dtype; NaN stays NaN, ±inf saturates), in place on temporaries;
    FP8 E4M3 / E5M2 on a GPU use torch's float8 cast after saturation, which is the same rounding.
    """
    s = scale.to(x.dtype)
    z = None if zp is None else zp.to(x.dtype)
    # on the CPU the grid kernel beats torch's float8 casts (float8 -> bfloat16 is slow there); devices cast
    native = NATIVE_FP8.get(fmt.name) if isinstance(fmt, formats.FloatFormat) and x.device.type != "cpu" else None
    if x.requires_grad or s.requires_grad or not (native is not None or isinstance(fmt, formats.IntFormat)):
        if z is None and isinstance(fmt, formats.FloatFormat):
            q = round_div16(x, s, fmt.grid)  # one scale per row of the last dimension: chunk by chunk
            if q is not None:
                return q
        return fmt.quantize(x / s) * s if z is None else (fmt.quantize(x / s + z) - z) * s
    t = x / s
    if native is not None:  # FP8 (zero point only for INT): torch's saturated cast rounds exactly like the grid
        return t.clamp_(-fmt.max, fmt.max).to(native).to(x.dtype).mul_(s)
    if z is not None:
        t = t + z if t.shape != torch.broadcast_shapes(t.shape, z.shape) else t.add_(z)
        return t.round_().clamp_(fmt.qmin, fmt.qmax).sub_(z).mul_(s)
    return t.round_().clamp_(fmt.qmin, fmt.qmax).mul_(s)


def fake_quant_table(fmt: formats.Format, scale: torch.Tensor, zp: torch.Tensor | None, dtype: torch.dtype
                     ) -> torch.Tensor:
    """:func:`fake_quant` with one scalar ``scale`` (and ``zp``) applied to every value of the 16-bit ``dtype``, in
    the order of :func:`dmq.formats.grid.lookup16`: an elementwise function of a 16-bit input is one lookup in it."""
    return fake_quant(every16(dtype), fmt, scale.reshape(()), None if zp is None else zp.reshape(()))


def fake_quant_lookup(x: torch.Tensor, fmt: formats.Format, table: torch.Tensor) -> torch.Tensor:
    """:func:`fake_quant` of a 16-bit ``x`` through its :func:`fake_quant_table`, bit for bit, in the memory layout
    :func:`fake_quant` gives (INT grids compute in place on ``x / s``, which keeps ``x``'s strides; the other grids
    return a contiguous tensor), so that the matmuls after it see the same operands."""
    if isinstance(fmt, formats.IntFormat) and not x.is_contiguous():
        order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
        xp = x.permute(order)
        if xp.is_contiguous():  # x is a permuted dense tensor: look up in memory order, permute back
            return lookup16(xp, table).permute([order.index(d) for d in range(x.ndim)])
        out = torch.empty_like(x)
        return out.copy_(lookup16(x, table))
    return lookup16(x, table)


def to_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with ``dim`` moved last and the rest flattened: ``(R, K)``."""
    x = x.movedim(dim, -1)
    return x.reshape(-1, x.shape[-1])


def from_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(like.movedim(dim, -1).shape)
    return rows.reshape(shape).movedim(-1, dim)


def grouped(rows: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``(R, K)`` rows as ``(R', G, g)`` groups (zero-padded for ``group``)."""
    r, k = rows.shape
    if granularity == "tensor":
        return rows.reshape(1, 1, r * k)
    if granularity in ("channel", "token"):
        return rows.reshape(r, 1, k)
    if granularity == "group":
        pad = -k % group_size
        if pad:
            rows = F.pad(rows, (0, pad))
        return rows.reshape(r, -1, group_size)
    raise ValueError(f"granularity {granularity!r} has no element-wise grouping")


def ungrouped(groups: torch.Tensor, rows_shape: torch.Size) -> torch.Tensor:
    r, k = rows_shape
    return groups.reshape(r, -1)[:, :k]


def quantize_rows_dynamic(rows: torch.Tensor, fmt: formats.Format, granularity: str, group_size: int,
                          symmetric: bool) -> torch.Tensor:
    """Min-max fake quantization of ``(R, K)`` rows with one scale per group, computed from the rows themselves."""
    if fmt.is_block:
        return fmt.quantize(rows, dim=-1)
    g = grouped(rows, granularity, group_size)
    amax = abs_amax(g) if symmetric else None  # 16-bit rows: max |x| on int16 patterns, no finite copy
    if amax is not None and bool(torch.isfinite(amax).all()):
        # max(|amin|, |amax|) of the finite values is max |x| when every value is finite: the same scale
        scale, zp = params_from_range(amax, amax, fmt, True)
        return ungrouped(fake_quant(g, fmt, scale, zp), rows.shape)
    finite = g.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    scale, zp = params_from_range(finite.amin(-1, keepdim=True), finite.amax(-1, keepdim=True), fmt, symmetric)
    return ungrouped(fake_quant(g, fmt, scale, zp), rows.shape)


def search_candidates(estimator: str) -> list[float]:
    """Range multipliers a search tries: MSE clipping ratios, or ``2^-db`` for the FP exponent-bias offsets db."""
    if estimator == "mse":
        return MSE_RATIOS
    if estimator == "fp_bias":
        return [2.0 ** -d for d in FP_BIAS_OFFSETS]
    return [1.0]


def weight_qparams(w: torch.Tensor, fmt: formats.Format, granularity: str, group_size: int, symmetric: bool,
                   estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The static range search of :func:`quantize_weight`: the float32 groups ``(R', G, g)`` of ``w`` and the chosen
    ``scale`` (and ``zero_point`` or None) per group, ``(R', G, 1)``. Element formats only.

    ``mse`` / ``fp_bias`` pick, per group, the range multiplier with the least squared reconstruction error.
    ``percentile`` on a weight acts as min-max (weights have no outliers worth clipping by rank at this size).
    Group-wise scales are rounded to float16 where float16 holds them as a normal number, so that a packed
    checkpoint stores them in two bytes (torchao / AWQ / GPTQ store group scales in 16 bits too).
    """
    rows = w.detach().reshape(w.shape[0], -1)
    g = grouped(rows.float(), granularity, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_s, best_z, best_err = None, None, None
    for c in search_candidates(estimator):
        scale, zp = params_from_range(lo * c, hi * c, fmt, symmetric)
        if granularity == "group":
            s16 = scale.half().float()
            scale = torch.where(torch.isfinite(s16) & (s16 >= 2.0**-14), s16, scale)
        err = (fake_quant(g, fmt, scale, zp) - g).pow_(2).sum(-1, keepdim=True)
        if best_s is None:
            best_s, best_z, best_err = scale, zp, err
        else:
            better = err < best_err
            best_s = torch.where(better, scale, best_s)
            best_z = None if zp is None else torch.where(better, zp, best_z)
            best_err = torch.where(better, err, best_err)
    return g, best_s, best_z


def quantize_weight(w: torch.Tensor, fmt: formats.Format, granularity: str, group_size: int, symmetric: bool,
                    estimator: str, tensor_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Static fake quantization of a weight (output channels on dim 0; the rest is the reduction dimension), with the
    scales of :func:`weight_qparams` (block formats: their own block scales). ``tensor_amax``: the whole weight's
    for a format with a tensor scale (NVFP4), when ``w`` is a slice of rows."""
    rows = w.detach().reshape(w.shape[0], -1)
    if fmt.is_block:
        kw = {} if tensor_amax is None else {"tensor_amax": tensor_amax}
        return fmt.quantize(rows, dim=-1, **kw).reshape(w.shape)
    g, scale, zp = weight_qparams(w, fmt, granularity, group_size, symmetric, estimator)
    return ungrouped(fake_quant(g, fmt, scale, zp), rows.shape).reshape(w.shape).to(w.dtype)
