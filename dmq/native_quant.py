"""Dynamic activation quantizers (NVFP4, MX, per-token float) in one native pass over a dense bfloat16 tensor.

The eager form of a dynamic quantizer moves the quantized dimension last (a copy for a convolution's channels),
takes the block maxima, computes the scales on small tensors and rounds chunk by chunk, then restores the layout:
about twenty PyTorch operations per call. ``native.quant_blocks_bf16`` does all of it in the tensor's own layout
with the same arithmetic, so the result is bit for bit the eager one, in the same memory layout
(``tests/dmq/test_native_quant.py``). It applies where the eager fast paths (``abs_amax``, ``block_chunked``,
``mx_16bit``) would, and falls back to them otherwise: another dtype, a length that is not a multiple of the block,
a non-finite value, a scaled (exponent-biased) grid.
"""

from __future__ import annotations

import torch

from dmq import formats, native
from dmq.formats.block import _E4M3, MXFormat, NVFP4Format
from dmq.formats.grid import DISABLED

_PATHS = ("native16", "abs_amax", "block_chunked")


def dynamic(x: torch.Tensor, dim: int, fmt: formats.Format, granularity: str, symmetric: bool) -> torch.Tensor | None:
    """The dynamic quantizer's result for ``x`` along ``dim`` (what ``TensorQuantizer`` computes through
    :func:`dmq.fake_quant.quantize_rows_dynamic`), or None where the native path does not apply."""
    if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() == 0 or any(p in DISABLED for p in _PATHS)
            or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()):
        return None
    if x.is_contiguous():
        return _dense(x, dim, fmt, granularity, symmetric)
    # the eager quantizer works on x with dim moved last (a copy unless that is already dense: a channels-last
    # input quantized along its channels) and hands its result back in that layout; so does this path
    xr = x.movedim(dim, -1)
    q = _dense(xr.contiguous(), x.ndim - 1, fmt, granularity, symmetric)
    return None if q is None else q.movedim(-1, dim)


def _dense(x: torch.Tensor, dim: int, fmt: formats.Format, granularity: str, symmetric: bool) -> torch.Tensor | None:
    if isinstance(fmt, NVFP4Format):
        return native.quant_blocks_bf16(x, dim, fmt.block_size, native.NVFP4, fmt.element.grid, fmt.element.max,
                                        _E4M3.grid, _E4M3.min_subnormal)
    if isinstance(fmt, MXFormat):
        if "mx_16bit" in DISABLED:
            return None
        return native.quant_blocks_bf16(x, dim, fmt.block_size, native.MX, fmt.element.grid, fmt.element.max,
                                        emax=fmt.element.emax)
    if isinstance(fmt, formats.FloatFormat) and symmetric and granularity in ("token", "channel"):
        return native.quant_blocks_bf16(x, dim, x.shape[dim], native.TOKEN, fmt.grid, fmt.max)
    return None
