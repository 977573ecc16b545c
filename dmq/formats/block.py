"""Block-scaled formats: OCP MX (E8M0 power-of-two scales) and NVFP4 (E4M3 block scales, FP32 tensor scale).

Both quantize along one dimension (the last by default, the reduction dimension of a linear weight). A length
that is not a multiple of the block size ends in a shorter block: it is padded with zeros, which never change a
block's maximum, quantized, and the padding is dropped. Non-finite elements do not set a block's scale: NaN stays
NaN, and ±inf saturates to the block's largest value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from dmq.formats.element import FloatFormat
from dmq.formats.grid import DISABLED, abs_amax, round_div16, round_scaled16, work_dtype

E8M0_BIAS = 127
_E4M3 = FloatFormat(4, 3)


def _to_blocks(x: torch.Tensor, dim: int, block: int) -> tuple[torch.Tensor, int]:
    """``x`` moved to a work dtype with ``dim`` last, zero-padded and viewed as ``(..., n_blocks, block)``."""
    w = x.movedim(dim, -1).to(work_dtype(x.dtype))
    n = w.shape[-1]
    pad = -n % block
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], -1, block), n


def _blocks16(x: torch.Tensor, dim: int, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eager shortcut of :func:`_to_blocks` and :func:`_finite_amax` for a 16-bit ``x`` whose length is a
    multiple of ``block``: its blocks in ``x``'s own dtype (no float32 copy) and their float32 absolute maxima from
    :func:`dmq.formats.grid.abs_amax` (the same values). None where it does not apply or a block is not finite (the
    reference then handles the non-finite values)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.numel() == 0:
        return None
    v = x.movedim(dim, -1)
    if v.shape[-1] % block:
        return None
    b = v.reshape(*v.shape[:-1], -1, block)
    amax = abs_amax(b)
    if amax is None or not bool(torch.isfinite(amax).all()):
        return None
    return b, amax.to(torch.float32)


def _from_blocks(w: torch.Tensor, n: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    w = w.reshape(*w.shape[:-2], -1)[..., :n]
    return w.movedim(-1, dim).to(dtype)


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``2^e`` for integer ``e`` (subnormal results included)."""
    return torch.ldexp(torch.ones(e.shape, dtype=dtype, device=e.device), e)


def _finite_amax(w: torch.Tensor) -> torch.Tensor:
    a = w.abs()
    if not torch.compiler.is_compiling():  # eager: drop non-finite values only when there are any
        m = a.amax(-1, keepdim=True)  # a NaN or inf makes its block's maximum non-finite
        if bool(torch.isfinite(m).all()):
            return m
    return a.nan_to_num_(nan=0.0, posinf=0.0).amax(-1, keepdim=True)


@dataclass(frozen=True)
class MXFormat:
    """OCP Microscaling v1.0: ``block_size`` elements share the scale ``X = 2^(floor(log2 amax) - emax_elem)``,
    stored as E8M0 (exponent clamped to [-127, 127]); elements are ``RNE(V / X)``, saturating."""

    name: str
    element: FloatFormat
    block_size: int = 32
    is_block = True

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def bits_per_element(self) -> float:
        """Storage cost including the shared 8-bit scale."""
        return self.element.bits + 8 / self.block_size

    def scale_exponents(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Unbiased E8M0 exponents of each block, shape ``(..., n_blocks, 1)`` with ``dim`` moved last."""
        w, _ = _to_blocks(x, dim, self.block_size)
        return self._exponents(w)

    def _exponents(self, w: torch.Tensor) -> torch.Tensor:
        return self._exponents_of(_finite_amax(w))

    def _exponents_of(self, amax: torch.Tensor) -> torch.Tensor:
        # frexp gives amax = m * 2^k with m in [0.5, 1), so floor(log2 amax) = k - 1; amax = 0 takes the smallest scale
        e = torch.frexp(amax).exponent - 1 - self.element.emax
        e = torch.where(amax > 0, e, -E8M0_BIAS)
        return e.clamp_(-E8M0_BIAS, E8M0_BIAS)

    def quantize(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Fake quantization along ``dim``: ``X * RNE(V / X)`` per block, in ``x``'s dtype.

        A bfloat16 input is divided, rounded and multiplied in bfloat16 (path ``mx_16bit``), bit for bit the float32
        computation: ``X`` is a power of two that bfloat16 holds exactly (``X >= 2^-127``); ``V / X`` keeps ``V``'s 8
        significant bits unless it falls below ``2^-126``, far under half the smallest step of every MX element
        grid, where both round to a zero of ``V``'s sign; and ``RNE(V / X) * X`` is exact in float32, so rounding it
        to bfloat16 once, as the bfloat16 multiply does, is the reference's final cast."""
        fast = _blocks16(x, dim, self.block_size) if x.dtype == torch.bfloat16 and "mx_16bit" not in DISABLED else None
        if fast is not None:
            b, amax = fast
            scale = _pow2(self._exponents_of(amax), torch.float32).to(x.dtype)
            q = round_div16(b, scale, self.element.grid)  # the same, chunk by chunk in cache
            if q is None:
                q = self.element.quantize(b / scale).mul_(scale)
            return _from_blocks(q, b.shape[-2] * b.shape[-1], dim, x.dtype)
        w, n = _to_blocks(x, dim, self.block_size)
        scale = _pow2(self._exponents(w), w.dtype)
        q = self.element.quantize(w / scale) * scale  # both exact: scale is a power of two
        return _from_blocks(q, n, dim, x.dtype)

    def encode(self, x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Element codes ``(..., n_blocks, block)`` and E8M0 scale bytes ``(..., n_blocks)``, with ``dim`` last."""
        w, _ = _to_blocks(x, dim, self.block_size)
        e = self._exponents(w)
        codes = self.element.encode(w / _pow2(e, w.dtype))
        return codes, (e.squeeze(-1) + E8M0_BIAS).to(torch.uint8)

    def decode(
        self, codes: torch.Tensor, scales: torch.Tensor, n: int | None = None, dim: int = -1,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Inverse of :meth:`encode`; ``n`` is the original length along ``dim`` (default: all of it)."""
        if scales.dtype != torch.uint8 or (scales == 255).any():
            raise ValueError("MX scales must be uint8 E8M0 bytes other than 255 (NaN)")
        vals = self.element.decode(codes, torch.float32)
        q = vals * _pow2(scales.long().unsqueeze(-1) - E8M0_BIAS, torch.float32)
        return _from_blocks(q, n if n is not None else codes.shape[-2] * codes.shape[-1], dim, dtype)


@dataclass(frozen=True)
class NVFP4Format:
    """NVFP4: 16-element blocks of E2M1 with an E4M3 block scale, times one FP32 per-tensor scale.

    ``s_t = amax / (448 * 6)``; ``s_b = e4m3(clamp(amax_block / 6 / s_t, 2^-9, 448))``;
    ``x ≈ e2m1(x / (s_b * s_t)) * (s_b * s_t)``. The tensor ``amax`` is the finite maximum of ``x`` unless a
    calibrated ``tensor_amax`` is given. The lower clamp is E4M3's smallest subnormal, so no scale is zero.
    """

    name: str = "nvfp4"
    block_size: int = 16
    is_block = True

    @cached_property
    def element(self) -> FloatFormat:
        return FloatFormat(2, 1)

    @property
    def bits(self) -> int:
        return 4

    @property
    def bits_per_element(self) -> float:
        return 4 + 8 / self.block_size

    def _scales(self, w: torch.Tensor, tensor_amax: float | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scales_of(_finite_amax(w), tensor_amax, w.dtype)

    def _scales_of(self, block_amax: torch.Tensor, tensor_amax: float | torch.Tensor | None, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        elem_max, scale_max = self.element.max, _E4M3.max
        # the tensor's finite maximum is the largest block maximum (zero padding changes neither)
        amax = block_amax.amax() if tensor_amax is None else torch.as_tensor(tensor_amax)
        s_t = (amax.to(dtype) / (scale_max * elem_max)).reshape(())
        if not torch.compiler.is_compiling() and (not torch.isfinite(s_t) or s_t < 0):
            raise ValueError(f"tensor amax must be finite and non-negative, got {float(amax)}")
        # an all-zero tensor (s_t = 0) gets zero scales; no branch on s_t, so torch.compile traces it whole
        zero = s_t == 0
        safe = torch.where(zero, torch.ones_like(s_t), s_t)
        s_b = _E4M3.quantize((block_amax / elem_max / safe).clamp_(_E4M3.min_subnormal, scale_max))
        return s_t, torch.where(zero, torch.zeros_like(s_b), s_b)

    def quantize(
        self, x: torch.Tensor, dim: int = -1, tensor_amax: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        fast = _blocks16(x, dim, self.block_size)
        if fast is not None:  # a 16-bit input: no float32 copy, the block maxima on int16 (see _blocks16)
            b, block_amax = fast
            s_t, s_b = self._scales_of(block_amax, tensor_amax, torch.float32)
            if bool(s_t != 0):
                denom = s_b * s_t
                q = round_scaled16(b, denom, self.element.grid)  # the same, chunk by chunk in cache
                if q is None:
                    q = self.element.quantize(b / denom).mul_(denom)  # 16-bit / float32: the float32 quotient
                return _from_blocks(q, b.shape[-2] * b.shape[-1], dim, x.dtype)
        w, n = _to_blocks(x, dim, self.block_size)
        s_t, s_b = self._scales(w, tensor_amax)
        if not torch.compiler.is_compiling() and bool(s_t != 0):  # eager, the usual case: no guard passes
            denom = s_b * s_t
            return _from_blocks(self.element.quantize(w / denom).mul_(denom), n, dim, x.dtype)
        zero = s_t == 0  # an all-zero tensor: keep NaN, zero the rest (branch-free, see _scales)
        denom = torch.where(zero, torch.ones_like(s_t), s_b * s_t)
        q = torch.where(zero, w * 0.0, self.element.quantize(w / denom) * denom)
        return _from_blocks(q, n, dim, x.dtype)

    def encode(
        self, x: torch.Tensor, dim: int = -1, tensor_amax: float | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E2M1 codes ``(..., n_blocks, 16)``, E4M3 block-scale bytes ``(..., n_blocks)`` and the FP32 ``s_t``."""
        w, _ = _to_blocks(x, dim, self.block_size)
        s_t, s_b = self._scales(w, tensor_amax)
        if s_t == 0:
            s_b = torch.ones_like(s_b)
            codes = self.element.encode(w * 0.0)
        else:
            codes = self.element.encode(w / (s_b * s_t))
        return codes, _E4M3.encode(s_b.squeeze(-1)), s_t.to(torch.float32)

    def decode(
        self, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, n: int | None = None,
        dim: int = -1, dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        s_b = _E4M3.decode(scales, torch.float32).unsqueeze(-1)
        if torch.isnan(s_b).any():
            raise ValueError("NVFP4 block scales hold a NaN code")
        q = self.element.decode(codes, torch.float32) * (s_b * tensor_scale.to(torch.float32))
        return _from_blocks(q, n if n is not None else codes.shape[-2] * codes.shape[-1], dim, dtype)
