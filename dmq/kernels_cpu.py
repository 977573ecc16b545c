"""x86 CPU kernels of frozen Linear layers, through the kernels PyTorch ships (no extra dependency).

- :func:`onednn_int8_linear`: u8 activations x s8 weights on oneDNN's VNNI int8 GEMM
  (``torch.ops.onednn.qlinear_pointwise``), with the dequantization ``acc * (s_a s_w[n]) + b`` fused into its
  epilogue. The weight is reordered once into oneDNN's blocked layout (:func:`prepack_int8`).
- :func:`onednn_int8_conv`: the same for a convolution (``torch.ops.onednn.qconv2d_pointwise``); on this CPU it
  ran 4x faster than the float32 convolution and 30x faster than the BF16 one of a U-Net layer (docs/runtime.md).
- :func:`int4_weight_linear`: weight-only INT4 group-wise, dequantized inside the GEMM
  (``torch.ops.aten._weight_int4pack_mm_for_cpu``): no float copy of the weight ever exists.
- :func:`tiled_linear`: any other packed weight (and INT4 from ``INT4_MAX_ROWS`` input rows on), dequantized
  tiles of at least ``TILE_MIN_ROWS`` rows straight into the GEMM of its output columns, in
  float32 where that GEMM is the faster one (:func:`tile_gemm_dtype`): no full-weight float copy per call.

Every function returns ``None`` when its kernel cannot run (missing op, unsupported dtype or shape): the caller
falls back to the next path. See :mod:`dmq.kernels` for the dispatch and the exactness bounds.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _has(ns: object, name: str) -> bool:
    try:
        return hasattr(ns, name)
    except (RuntimeError, AttributeError):  # an op namespace that fails to load
        return False


@functools.cache
def onednn_int8_ok() -> bool:
    """oneDNN's int8 linear exists and sums exactly here.

    Checked once on a worst case: u8 255 x s8 -128 over K = 4096 overflows the int16 intermediate of a CPU without
    VNNI (``vpmaddubsw`` saturates), which VNNI's ``vpdpbusd`` does not have; any mismatch turns the path off.
    """
    if not (_has(torch.ops.onednn, "qlinear_pointwise") and _has(torch.ops.onednn, "qlinear_prepack")):
        return False
    try:
        k = 4096
        a = torch.full((2, k), 255, dtype=torch.uint8)
        a[1, ::3] = 0
        w = torch.full((3, k), 127, dtype=torch.int8)
        w[1] = -128
        w[2, ::2] = -128
        ref = (a.double() - 3.0) @ w.double().t()
        y = onednn_int8_linear(a, 1.0, 3, prepack_int8(w), torch.ones(3), None, torch.float32)
        return bool(torch.equal(y.double(), ref.float().double()))
    except (RuntimeError, TypeError) as e:
        logger.info("oneDNN int8 linear unavailable: %s", e)
        return False


def prepack_int8(w_codes: torch.Tensor) -> torch.Tensor:
    """int8 ``(N, K)`` weight codes -> oneDNN's opaque blocked weight (done once per layer)."""
    return torch.ops.onednn.qlinear_prepack(w_codes.contiguous(), None)


def onednn_int8_linear(a_u8: torch.Tensor, a_scale: float, a_zp: int, w_packed: torch.Tensor,
                       w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``y = s_a s_w[n] * sum_k (a[m, k] - z) w[n, k] + b[n]`` on oneDNN: the sum is exact in int32, the epilogue
    (scale product, int32 -> float32 conversion, bias) runs in float32 and the result is rounded once to
    ``out_dtype``. ``a_u8`` is ``(M, K)`` uint8; ``w_scale`` float32 ``(N,)``."""
    zeros = _zeros(w_scale.shape[0])
    return torch.ops.onednn.qlinear_pointwise(a_u8, a_scale, a_zp, w_packed, w_scale, zeros, bias, 1.0, 0, out_dtype,
                                              "none", [None], "")


@functools.cache
def onednn_conv_ok() -> bool:
    """oneDNN's int8 convolution exists and sums exactly here (the worst case of :func:`onednn_int8_ok`, as a 1x1
    convolution over 4096 input channels)."""
    if not (_has(torch.ops.onednn, "qconv2d_pointwise") and _has(torch.ops.onednn, "qconv_prepack")):
        return False
    try:
        k = 4096
        a = torch.full((1, k, 1, 2), 255, dtype=torch.uint8)
        a[0, ::3, 0, 1] = 0
        w = torch.full((3, k, 1, 1), 127, dtype=torch.int8)
        w[1] = -128
        w[2, ::2] = -128
        ref = torch.einsum("kp,nk->np", a[0].reshape(k, 2).double() - 3.0, w.reshape(3, k).double())
        conv = (1, 1), (0, 0), (1, 1), 1
        y = onednn_int8_conv(a, 1.0, 3, prepack_conv(w, conv), torch.ones(3), None, conv, torch.float32)
        return bool(torch.equal(y.double().reshape(3, 2), ref.float().double()))
    except (RuntimeError, TypeError) as e:
        logger.info("oneDNN int8 convolution unavailable: %s", e)
        return False


def prepack_conv(w_codes: torch.Tensor, conv: tuple) -> torch.Tensor:
    """int8 ``(O, C / groups, kh, kw)`` weight codes -> oneDNN's blocked convolution weight; ``conv`` is
    ``(stride, padding, dilation, groups)``. The packing does not depend on the activation scale or zero point."""
    stride, padding, dilation, groups = conv
    n = w_codes.shape[0]
    return torch.ops.onednn.qconv_prepack(w_codes.contiguous(), torch.ones(n), 1.0, 0, list(stride), list(padding),
                                          list(dilation), groups, None)


def onednn_int8_conv(a_u8: torch.Tensor, a_scale: float, a_zp: int, w_packed: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, conv: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """The convolution of :func:`onednn_int8_linear`: ``y = s_a s_w[o] * sum (a - z) w + b[o]``, exact int32 sums,
    float32 epilogue, one rounding to ``out_dtype``; ``a_u8`` is ``(N, C, H, W)`` uint8. The result is contiguous
    (oneDNN writes channels-last; the fake-quant convolution it replaces returns the default layout)."""
    stride, padding, dilation, groups = conv
    y = torch.ops.onednn.qconv2d_pointwise(a_u8, a_scale, a_zp, w_packed, w_scale, _zeros(w_scale.shape[0]), bias,
                                           list(stride), list(padding), list(dilation), groups, 1.0, 0, out_dtype,
                                           "none", [], "")
    return y.contiguous()


@functools.lru_cache(maxsize=256)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- weight-only INT4
INT4_GROUPS = (32, 64, 128, 256)
# the int4pack kernel re-dequantizes the weight for every block of rows; from about 256 input rows on, one tile
# dequantization and the float32 GEMM were faster here (one 1152 x 4608 layer: int4pack 0.64x BF16 at 16 rows, 1.18x
# at 128, 1.29x at 256 and 512, against the tiled path's 5.1x, 1.6x, 1.3x and 0.92x; docs/runtime.md)
INT4_MAX_ROWS = 256


def int4_weight_ok() -> bool:
    return _has(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and _has(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def prepack_int4(codes: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Signed INT4 codes ``(N, K)`` (int8 in -8..7) with one scale per group ``(N, K / g)`` -> the int4pack weight and
    its ``(K / g, N, 2)`` scales-and-zeros in ``dtype`` (the kernel computes ``(u - 8) * scale + zero`` with
    ``u = code + 8``, so the zeros are 0). ``None`` when the kernel does not take the shape."""
    n, k = codes.shape
    if group_size not in INT4_GROUPS or k % group_size or dtype not in (torch.bfloat16, torch.float32,
                                                                        torch.float16):
        return None
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8).contiguous(), 1)
    except RuntimeError as e:
        logger.info("int4pack declines a %dx%d weight: %s", n, k, e)
        return None
    s = scale.to(torch.float32).reshape(n, k // group_size).t()
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).to(dtype).contiguous()
    return packed, sz


def int4_weight_linear(x2d: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with ``W = code * scale`` dequantized inside the GEMM (float32 accumulation)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), packed, group_size, scales_zeros)
    return y if bias is None else y.add_(bias)


# ---------------------------------------------------------------------------------------------- tiled dequant
# a tile is TILE_ELEMS elements of dequantized weight, but at least TILE_MIN_ROWS rows: the GEMM of a narrow tile
# streams the whole input once per tile, and with K = 4608 a 64k-element tile is 16 rows. Measured on DiT-XL's two
# MLP layers (docs/runtime.md): 16-row tiles ran at 1.12x / 1.67x BF16 (512 / 2048 input rows), 512-row tiles at
# 0.77x / 0.69x; 128 and 256 rows were in between and 1024 within noise of 512.
TILE_ELEMS = 1 << 16
TILE_MIN_ROWS = 512
# at most this many input rows (the per-sample layers at small batch) take the fused dequantize-and-multiply loop
GEMV_MAX_ROWS = 8


@functools.cache
def tile_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tile of weights is multiplied in for a ``dtype`` input on this CPU.

    A 16-bit tile is rounded to ``dtype`` first (the reference's own weight) and then multiplied in float32 unless
    the CPU has AMX for that dtype: without AMX, oneDNN's BF16 GEMM of a freshly dequantized (not prepacked) tile
    ran about 1.5x slower than the float32 GEMM on the AVX-512 BF16 machine this was measured on (docs/runtime.md),
    and both accumulate in float32, so the result differs only in summation order.
    """
    amx = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}.get(dtype)
    if amx is None:
        return dtype
    probe = getattr(torch.cpu, amx, None)
    return dtype if probe is not None and probe() else torch.float32


def tiled_linear(x2d: torch.Tensor, n: int, dequant_rows, bias: torch.Tensor | None,
                 tile_elems: int | None = None, gemm_dtype: torch.dtype | None = None,
                 x_gemm: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 rounded: bool = False, gemv=None) -> torch.Tensor:
    """``x W^T + b`` where ``dequant_rows(r0, r1)`` gives rows ``r0:r1`` of ``W`` (float32 or ``x``'s dtype). Each
    tile of rows is rounded to ``x``'s dtype (the weight the reference multiplies by), multiplied in ``gemm_dtype``
    (default: ``x``'s) into its output columns at once, and the result rounded once to ``x``'s dtype. ``x_gemm``:
    ``x2d`` already cast to ``gemm_dtype``; ``dtype``: ``x``'s dtype when ``x2d`` is that cast (default
    ``x2d.dtype``); ``rounded``: ``dequant_rows`` gives its rows already rounded to ``dtype``, in ``gemm_dtype``;
    ``gemv(x_gemm, bias)``: the same product for a few rows without tiles, in ``gemm_dtype``, or None (a 16-bit input
    with a float32 GEMM only: ``dmq.packed.RowDequantizer.gemv``)."""
    k, dtype = x2d.shape[1], (x2d.dtype if dtype is None else dtype)
    gd = dtype if gemm_dtype is None else gemm_dtype
    xg = x2d.to(gd) if x_gemm is None else x_gemm
    bg = None if bias is None else bias.detach().to(gd)  # inference kernel: no autograd graph

    def tile(r0: int, r1: int) -> torch.Tensor:
        return dequant_rows(r0, r1) if rounded else dequant_rows(r0, r1).to(dtype).to(gd)

    # only where the tiles already change the GEMM's dtype (a 16-bit input multiplied in float32): there the product
    # differs from the reference's in summation order anyway, and a float32 input keeps its bit-exact single tile
    if gemv is not None and gd == torch.float32 and dtype != gd and x2d.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(xg.contiguous(), bg)
        if y is not None:
            return y.to(dtype)
    step = max(TILE_MIN_ROWS, (tile_elems or TILE_ELEMS) // max(1, k) // 16 * 16)
    if step >= n:
        return F.linear(xg, tile(0, n), bg).to(dtype)
    out = torch.empty(x2d.shape[0], n, dtype=dtype, device=x2d.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out[:, r0:r1] = F.linear(xg, tile(r0, r1), None if bg is None else bg[r0:r1])
    return out
