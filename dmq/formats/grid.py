"""The one rounding kernel behind every element format.

Every grid in :mod:`dmq.formats` is described by five numbers: a clamp interval ``[lo, hi]``, the smallest
normal exponent ``emin``, the number of mantissa bits ``man_bits`` and a scale. Within a binade ``[2^e, 2^(e+1))``
the grid step is ``2^(max(e, emin) - man_bits)``; below ``2^emin`` the step stays ``2^(emin - man_bits)``
(subnormals). An INT grid is the special case ``emin = man_bits = bits``, where the step is 1 everywhere.

Rounding uses the float unit itself: adding ``S = 2^(max(e, emin) + W - man_bits)`` (``W`` = 23 for float32, 52
for float64) to ``|x|`` leaves a sum whose unit in the last place is exactly the grid step, so the hardware's
round-to-nearest-even rounds ``|x|`` to the grid; subtracting ``S`` is then exact. ``S`` comes from the exponent
bits of ``|x|`` with a mask. The whole kernel is a handful of in-place elementwise passes.

On the CPU two lookups replace those passes (on by default; ``dmq.kernels.disable("grid_table")`` turns them off):

- a 16-bit input (bfloat16, float16) has 65536 bit patterns, so its result is one gather from a table of the
  kernel's own result for every pattern (bit for bit the kernel, by construction);
- a float32 input on a grid of at most 5 mantissa bits is first rounded to 16 bits *to odd* (truncated, with the
  lowest kept bit set when any dropped bit is): bfloat16 keeps 7 mantissa bits, at least 2 more than the grid, so
  rounding the round-to-odd value to the grid gives the same point as rounding the float32 value (Boldo and
  Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008,
  Theorem 1), and the bfloat16 table above gives it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from dmq import native

# work dtype -> (integer view dtype, explicit mantissa bits, exponent-field mask, exponent bias)
_LAYOUT = {
    torch.float32: (torch.int32, 23, 0x7F800000, 127),
    torch.float64: (torch.int64, 52, 0x7FF0000000000000, 1023),
}
_CPU_CHUNK = 1 << 18
# a round-to-odd 16-bit value rounds like its float32 source onto grids with at most this many mantissa bits
_ODD_MAX_MAN_BITS = 5
DISABLED: set[str] = set()  # execution paths turned off; shared with (and set through) dmq.kernels.disable
_TABLES: dict = {}
# a 16-bit float's bit pattern with the sign bit cleared, read as int16, orders like its magnitude (NaN above inf)
_MAGNITUDE_BITS = {torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF}


@dataclass(frozen=True)
class GridSpec:
    """Parameters of :func:`round_to_grid` (see the module docstring)."""

    lo: float
    hi: float
    emin: int
    man_bits: int
    scale: float = 1.0


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes in: float64 stays float64, every narrower float widens exactly to float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"quantization needs a floating-point tensor, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to_grid(x: torch.Tensor, spec: GridSpec, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round ``x`` to the nearest point of the grid ``spec``, ties to even, saturating, NaN preserved.

    The result is computed in float32 (float64 for float64 input) and rounded once to ``out_dtype``
    (default ``x.dtype``). ``x`` is never modified.
    """
    out_dtype = out_dtype or x.dtype
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _RoundStraightThrough.apply(x, spec, out_dtype)
    if x.device.type == "cpu" and "grid_table" not in DISABLED and not torch.compiler.is_compiling():
        if x.dtype in (torch.bfloat16, torch.float16) and out_dtype == x.dtype:
            return _lookup16(x, _table(spec, x.dtype))
        if (x.dtype == torch.float32 and out_dtype == torch.float32 and spec.man_bits <= _ODD_MAX_MAN_BITS
                and spec.scale == 1.0 and spec.emin - spec.man_bits >= -126):
            return _lookup_odd(x, _table(spec, torch.bfloat16, torch.float32, signed=True))
    return _round_kernel(x, spec, out_dtype)


class _RoundStraightThrough(torch.autograd.Function):
    """:func:`round_to_grid` under autograd: the same values, and the clipped straight-through derivative (1 where
    ``x / scale`` lies within the grid's range, 0 where it saturates). The kernels work in place chunk by chunk,
    which autograd cannot follow past the first chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: GridSpec, out_dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            w = x.detach()
            ctx.save_for_backward((w >= spec.lo * spec.scale) & (w <= spec.hi * spec.scale))
            ctx.in_dtype = x.dtype
            return round_to_grid(w, spec, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return (grad * inside).to(ctx.in_dtype), None, None


def abs_amax(x: torch.Tensor) -> torch.Tensor | None:
    """``x.abs().amax(-1, keepdim=True)`` of a 16-bit float ``x``, bit for bit, or None when the fast form does not
    apply (another dtype, a gradient, a trace, or the ``abs_amax`` path turned off).

    Clearing the sign bit of an IEEE-style pattern leaves an integer that orders like the magnitude (NaN patterns
    above inf), so the reduction runs on int16: one masking pass and an integer maximum, about 3x faster here than
    a float ``abs`` and ``amax`` over 16-element blocks. A NaN anywhere in a row gives a NaN maximum, as ``amax``.
    """
    mask = _MAGNITUDE_BITS.get(x.dtype)
    if (mask is None or "abs_amax" in DISABLED or (x.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()):
        return None
    if "native16" not in DISABLED and x.device.type == "cpu":
        out = native.absmax16(x)
        if out is not None:
            return out
    return torch.bitwise_and(x.view(torch.int16), mask).amax(-1, keepdim=True).view(x.dtype)


def every16(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit float ``dtype``, in the order of their bit patterns read as uint16 (the index of
    :func:`lookup16`)."""
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)


def lookup16(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[pattern of x]`` for a 16-bit ``x`` (a contiguous result of ``x``'s shape)."""
    return _lookup16(x, table)


def _table(spec: GridSpec, dtype: torch.dtype, out_dtype: torch.dtype | None = None, signed: bool = False
           ) -> torch.Tensor:
    """The kernel's result for every bit pattern of the 16-bit ``dtype``, indexed by the pattern read as uint16, or
    (``signed``) by the pattern read as int16 plus 32768 (built once per grid, 128-256 KiB)."""
    key = (spec, dtype, out_dtype, signed)
    t = _TABLES.get(key)
    if t is None:
        if signed:
            every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        else:
            every = every16(dtype)
        t = _TABLES[key] = _round_kernel(every, spec, out_dtype or dtype)
    return t


def _lookup16(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return gather16(table, x.view(torch.uint16).reshape(-1)).reshape(x.shape)


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU work buffer of ``shape`` for one chunked kernel's use within one call, reused across calls on this
    thread (one per ``slot``, grown to the largest chunk seen; at most ``_CPU_CHUNK`` elements, 1 MiB each). A fresh
    chunk buffer is above glibc's mmap threshold, so every call page-faulted it in again: about 2.6k faults per
    call of the bundled DiT under ``w4a8-fp``. It carries nothing from one use to the next."""
    n = math.prod(shape)
    if n > _CPU_CHUNK:  # one row longer than a chunk: a buffer of its own
        return torch.empty(shape, dtype=dtype)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


# elements per chunk of gather16 (measured: 24k-element chunks were 1.4x slower, a whole-tensor index up to 2.7x)
_GATHER_CHUNK = _CPU_CHUNK
_GATHER_SMALL = 8192  # an index this small (32 KiB) comes from glibc's heap: no scratch needed


def gather16(table: torch.Tensor, bits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``table[bits + offset]`` for 16-bit integer ``bits`` (flat), as one ``index_select``. On the CPU a large input
    goes in chunks through one int32 index buffer kept across calls (:func:`_scratch`): a whole-tensor int32 index
    (twice the input's bytes) is a fresh allocation above glibc's mmap threshold on every call, and its first touch
    page-faulted (about 14 MB of faults per call of the bundled DiT under FP8, a quarter of the call's time)."""
    n = bits.numel()
    flip = {(torch.uint16, 0): 0, (torch.int16, 1 << 15): 1 << 15}.get((bits.dtype, offset))
    if flip is not None and "native16" not in DISABLED and bits.device.type == "cpu":
        out = native.gather16(table, bits.view(torch.uint16), flip)
        if out is not None:
            return out
    if bits.device.type != "cpu" or n <= _GATHER_SMALL:
        idx = bits.to(torch.int32)
        return table.index_select(0, idx.add_(offset) if offset else idx)
    out = torch.empty(n, dtype=table.dtype)
    idx = _scratch("gather", (min(n, _GATHER_CHUNK),), torch.int32)
    for i in range(0, n, _GATHER_CHUNK):
        j = min(n, i + _GATHER_CHUNK)
        ii = idx[: j - i].copy_(bits[i:j])
        torch.index_select(table, 0, ii.add_(offset) if offset else ii, out=out[i:j])
    return out


def _chunkable(blocks: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the ``block_chunked`` kernels take 16-bit CPU ``blocks`` ``(..., n, b)`` with one ``scale`` per row
    ``(..., n, 1)`` (eager, no gradient, not empty)."""
    return not ("block_chunked" in DISABLED or "grid_table" in DISABLED or blocks.device.type != "cpu"
                or blocks.dtype not in (torch.bfloat16, torch.float16) or blocks.dim() < 2 or blocks.numel() == 0
                or scale.shape != blocks.shape[:-1] + (1,) or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (blocks.requires_grad or scale.requires_grad)))


def round_scaled16(blocks: torch.Tensor, denom: torch.Tensor, spec: GridSpec) -> torch.Tensor | None:
    """``(round_to_grid(float32(blocks) / denom) * denom)`` rounded once to ``blocks``' 16-bit dtype, bit for bit,
    for 16-bit CPU ``blocks`` ``(..., n, b)`` and float32 ``denom`` ``(..., n, 1)`` (block-scaled formats with a
    non-power-of-two scale, NVFP4). Every pass (the widening, the quotient, the round-to-odd lookup of
    :func:`round_to_grid`, the product, the narrowing) runs on one cache-sized chunk of rows before the next chunk,
    instead of once over the whole tensor (path ``block_chunked``): the whole-tensor passes, the mixed-dtype quotient
    above all, spent about 10 ns an element here. None where the path does not apply."""
    if (not _chunkable(blocks, denom) or denom.dtype != torch.float32 or spec.man_bits > _ODD_MAX_MAN_BITS
            or spec.scale != 1.0 or spec.emin - spec.man_bits < -126):
        return None
    if "native16" not in DISABLED and blocks.dtype == torch.bfloat16:
        out = native.round_scaled_bf16(blocks.reshape(-1, blocks.shape[-1]), denom.reshape(-1, 1), spec)
        if out is not None:
            return out.reshape(blocks.shape)
    n, b = blocks.shape[-2], blocks.shape[-1]
    x = blocks.reshape(-1, n, b)
    d = denom.reshape(-1, n, 1)
    table = _table(spec, torch.bfloat16, torch.float32, signed=True)  # the quotient is float32 for both dtypes
    out = torch.empty(x.shape, dtype=x.dtype)
    step = max(1, _CPU_CHUNK // (n * b))
    rows = min(step, x.shape[0])
    w = _scratch("w", (rows, n, b), torch.float32)
    s = _scratch("s", (rows, n, b), torch.int32)
    for r0 in range(0, x.shape[0], step):
        r1 = min(r0 + step, x.shape[0])
        wi, si = w[: r1 - r0], s[: r1 - r0]
        wi.copy_(x[r0:r1]).div_(d[r0:r1])
        _odd_lookup(wi.reshape(-1), si.reshape(-1), table, wi.reshape(-1))  # in place: the index is read first
        out[r0:r1].copy_(wi.mul_(d[r0:r1]))
    return out.reshape(blocks.shape)


def round_div16(blocks: torch.Tensor, scale: torch.Tensor, spec: GridSpec) -> torch.Tensor | None:
    """``round_to_grid(blocks / scale) * scale`` with every operation in ``blocks``' 16-bit dtype, bit for bit, for
    16-bit CPU ``blocks`` ``(..., n, b)`` and ``scale`` ``(..., n, 1)`` of the same dtype (MX blocks, per-token and
    per-group FP activations; path ``block_chunked``). The quotient, the table lookup of :func:`round_to_grid` and
    the product run one cache-sized chunk of rows at a time. When every scale is a power of two with an exact
    reciprocal (MX), the quotient is the product with ``1 / scale``: the same exact value, rounded the same way, and
    a multiply is cheaper than a divide. None where the path does not apply."""
    if not _chunkable(blocks, scale) or scale.dtype != blocks.dtype:
        return None
    n, b = blocks.shape[-2], blocks.shape[-1]
    x = blocks.reshape(-1, n, b)
    sc = scale.reshape(-1, n, 1)
    inv = sc.reciprocal()
    pow2 = bool(((torch.frexp(sc.float()).mantissa == 0.5) & inv.isfinite()).all())
    if "native16" not in DISABLED and blocks.dtype == torch.bfloat16:
        out = native.round_div_bf16(x.reshape(-1, b), sc.reshape(-1, 1), spec, pow2)
        if out is not None:
            return out.reshape(blocks.shape)
    table = _table(spec, blocks.dtype, signed=True)
    out = torch.empty(x.shape, dtype=x.dtype)
    step = max(1, _CPU_CHUNK // (n * b))
    rows = min(step, x.shape[0])
    q = _scratch("q", (rows, n, b), x.dtype)
    idx = _scratch("s", (rows * n * b,), torch.int32)
    for r0 in range(0, x.shape[0], step):
        r1 = min(r0 + step, x.shape[0])
        qi, ii = q[: r1 - r0], idx[: (r1 - r0) * n * b]
        if pow2:
            torch.mul(x[r0:r1], inv[r0:r1], out=qi)
        else:
            torch.div(x[r0:r1], sc[r0:r1], out=qi)
        ii.copy_(qi.view(torch.int16).reshape(-1)).add_(1 << 15)
        torch.index_select(table, 0, ii, out=qi.reshape(-1))
        torch.mul(qi, sc[r0:r1], out=out[r0:r1])
    return out.reshape(blocks.shape)


def _lookup_odd(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to odd at 16 bits, then looked up (see the module docstring), in cache-sized chunks."""
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32)
    scratch = _scratch("s", (min(_CPU_CHUNK, flat.numel()),), torch.int32)
    for i in range(0, flat.numel(), _CPU_CHUNK):
        b = flat[i : i + _CPU_CHUNK]
        _odd_lookup(b, scratch[: b.numel()], table, out[i : i + _CPU_CHUNK])
    return out.reshape(x.shape)


def _odd_lookup(x: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """``out = table[round_to_odd16(x)]`` for flat float32 ``x``, through the int32 scratch ``idx`` (``out`` may be
    ``x`` itself: the index is complete before the gather writes)."""
    b = x.view(torch.int32)
    # bit 16 of (low 16 bits + 0xFFFF) is set iff a dropped bit is: OR it into the kept bits' lowest one; the
    # arithmetic shift leaves the 16 kept bits as an int16 value, offset to index the table
    torch.bitwise_and(b, 0xFFFF, out=idx)
    idx.add_(0xFFFF).bitwise_or_(b).bitwise_right_shift_(16).add_(1 << 15)
    torch.index_select(table, 0, idx, out=out)


def _round_kernel(x: torch.Tensor, spec: GridSpec, out_dtype: torch.dtype) -> torch.Tensor:
    """The arithmetic kernel of :func:`round_to_grid` (the module docstring)."""
    wd = work_dtype(x.dtype)
    int_dtype, width, exp_mask, exp_bias = _LAYOUT[wd]
    top = max(spec.emin, math.frexp(max(abs(spec.lo), abs(spec.hi)))[1] - 1)
    if spec.emin + exp_bias < 1 or top + width - spec.man_bits > exp_bias or not 0 <= spec.man_bits <= width:
        raise ValueError(f"grid with emin={spec.emin}, man_bits={spec.man_bits} does not fit the {wd} kernel")
    if torch.compiler.is_compiling():  # traced strides can disagree with eager ones: flatten a fresh copy
        x = x.clone(memory_format=torch.contiguous_format)
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
    # On the CPU the passes run chunk by chunk, so that they stay in cache: 1.6x faster than whole-tensor passes
    # on 16M elements here. Devices run the whole tensor at once.
    chunk = _CPU_CHUNK if x.device.type == "cpu" else max(flat.numel(), 1)
    scratch = torch.empty(min(chunk, flat.numel()), dtype=int_dtype, device=x.device)
    work = None if out_dtype == wd else torch.empty(scratch.shape, dtype=wd, device=x.device)
    s_min, s_add = (spec.emin + exp_bias) << width, (width - spec.man_bits) << width
    for i in range(0, flat.numel(), chunk):
        xi, oi = flat[i : i + chunk], out[i : i + chunk]
        w = oi if work is None else work[: oi.numel()]
        s = scratch[: w.numel()]
        w.copy_(xi)
        if spec.scale != 1.0:
            w.div_(spec.scale)
        w.clamp_(spec.lo, spec.hi)  # saturation; clamp keeps NaN
        # S = 2^(max(floor(log2|w|), emin) + width - man_bits), built in the exponent field; the mask drops the sign
        torch.bitwise_and(w.view(int_dtype), exp_mask, out=s)
        s.clamp_(min=s_min).add_(s_add)
        sf = s.view(wd)
        w.abs_().add_(sf).sub_(sf)  # NaN stays NaN through both: NaN + S is NaN
        if spec.lo < 0:
            w.copysign_(xi)
        if spec.scale != 1.0:
            w.mul_(spec.scale)
        if work is not None:
            oi.copy_(w)
    return out.reshape(x.shape)
