"""Element formats: INT grids and ExMy minifloats, as data over the one kernel in :mod:`dmq.formats.grid`.

Codes follow the usual bit layouts: two's complement for signed INT, ``sign | exponent field | mantissa`` for
minifloats. Every format has a code table (at most 2^13 entries here) that gives ``decode`` and ``values``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from dmq.formats.grid import GridSpec, round_to_grid

SPECIALS = ("finite", "fn", "ieee")


def default_special(exp_bits: int, man_bits: int) -> str:
    """The special-value convention a bare ``eXmY`` name means: E4M3 is FP8 E4M3FN, E5M2 is IEEE-like FP8, and
    every other minifloat is all-finite, as OCP MX defines FP6 and FP4."""
    return {(4, 3): "fn", (5, 2): "ieee"}.get((exp_bits, man_bits), "finite")


class ElementFormat:
    """Shared behaviour of INT and minifloat formats.

    Subclasses provide ``name``, ``bits``, ``grid`` and ``_default_code_values``.
    """

    name: str
    bits: int
    is_block = False

    @property
    def grid(self) -> GridSpec:
        raise NotImplementedError

    def _default_code_values(self) -> list[float]:
        """Value of every code ``0 .. 2^bits - 1`` on the unscaled grid (NaN and ±inf where the convention has
        them)."""
        raise NotImplementedError

    @property
    def max(self) -> float:
        """Largest finite value."""
        return self.grid.hi * self.grid.scale

    @property
    def min(self) -> float:
        """Smallest (most negative) finite value."""
        return self.grid.lo * self.grid.scale

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization: the nearest grid value in ``x``'s dtype, ties to even, saturating, NaN kept.

        ±inf saturates to ``±max`` like any other out-of-range value.
        """
        return round_to_grid(x, self.grid)

    @cached_property
    def _lut0(self) -> torch.Tensor:
        return torch.tensor(self._default_code_values(), dtype=torch.float64)

    @cached_property
    def _lut(self) -> torch.Tensor:
        # exact: grid values have <= 8 significant bits and the scale <= 16
        return self._lut0 * self.grid.scale

    def values(self) -> torch.Tensor:
        """The sorted finite grid as float64 (one zero)."""
        return self._sorted_table[0] * self.grid.scale

    @cached_property
    def _sorted_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Finite values of the unscaled grid, sorted, with the code of each; +0 wins over -0."""
        lut = self._lut0
        codes = torch.arange(lut.numel())
        finite = torch.isfinite(lut)
        vals, codes = lut[finite], codes[finite]
        # stable sort by value keeps the smaller code first among equal values: +0 (code 0) before -0
        order = torch.sort(vals, stable=True).indices
        vals, codes = vals[order], codes[order]
        keep = torch.ones_like(vals, dtype=torch.bool)
        keep[1:] = vals[1:] != vals[:-1]
        return vals[keep], codes[keep]

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits <= 8 else torch.int16

    @cached_property
    def _neg_zero_code(self) -> int | None:
        return None

    @cached_property
    def _nan_code(self) -> int | None:
        nan = torch.isnan(self._lut).nonzero()
        return int(nan[0]) if nan.numel() else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``quantize(x)``: ``decode(encode(x)) == quantize(x)`` bit for bit.

        Raises ``ValueError`` for NaN in a format that has no NaN code.
        """
        spec = self.grid
        # back to the unscaled grid; re-rounding there undoes any rounding of value * scale in x's dtype
        y = round_to_grid(self.quantize(x).to(torch.float64) / spec.scale, replace(spec, scale=1.0))
        vals, codes = self._sorted_table
        idx = torch.searchsorted(vals, y.nan_to_num(0.0).reshape(-1)).clamp_(max=vals.numel() - 1)
        out = codes[idx].reshape(y.shape)
        if self._neg_zero_code is not None:
            out = torch.where((y == 0) & torch.signbit(y), self._neg_zero_code, out)
        nan = torch.isnan(y)
        if nan.any():
            if self._nan_code is None:
                raise ValueError(f"format {self.name!r} has no NaN encoding, and the input holds NaN")
            out = torch.where(nan, self._nan_code, out)
        return out.to(self.code_dtype)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values of ``codes`` in ``dtype``, rounded as :meth:`quantize` rounds them."""
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= 2**self.bits):
            raise ValueError(f"codes of {self.name!r} must lie in [0, {2**self.bits - 1}]")
        v = self._lut.to(codes.device)[codes]
        return v if dtype == torch.float64 else v.to(torch.float32).to(dtype)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat(ElementFormat):
    """Integer grid: signed two's complement ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"INT formats have 2..8 bits, got {self.bits}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @cached_property
    def grid(self) -> GridSpec:
        # emin = man_bits = bits gives step 1 on |x| < 2^bits, which covers the whole clamped range
        return GridSpec(float(self.qmin), float(self.qmax), self.bits, self.bits)

    def _default_code_values(self) -> list[float]:
        n = 2**self.bits
        if not self.signed:
            return [float(c) for c in range(n)]
        return [float(c - n if c >= n // 2 else c) for c in range(n)]


@dataclass(frozen=True)
class FloatFormat(ElementFormat):
    """Minifloat ``ExMy`` with subnormals, rounded to nearest with ties to the even significand.

    With ``M = 0`` every significand is 1, and a tie goes to the larger magnitude, the even multiple of the
    smaller neighbour's step.

    Args:
        exp_bits: exponent bits E, 1..5.
        man_bits: mantissa bits M, 0..7.
        bias: exponent bias, any real within 64 of the default ``2^(E-1) - 1`` (LLM-FP4's bias search). A bias
            ``b`` scales the default grid by ``2^(b_default - b)`` (see :attr:`scale`).
        special: ``"finite"`` (all codes finite, OCP MX FP6/FP4), ``"fn"`` (only ``S.1..1.1..1`` is NaN, no inf,
            FP8 E4M3FN) or ``"ieee"`` (top exponent field holds inf and NaN, FP8 E5M2).
    """

    exp_bits: int
    man_bits: int
    bias: float | None = None
    special: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.exp_bits <= 5 or not 0 <= self.man_bits <= 7:
            raise ValueError(
                f"minifloats have 1..5 exponent and 0..7 mantissa bits, got e{self.exp_bits}m{self.man_bits}"
            )
        if self.special is None:
            object.__setattr__(self, "special", default_special(self.exp_bits, self.man_bits))
        if self.special not in SPECIALS:
            raise ValueError(f"special must be one of {SPECIALS}, got {self.special!r}")
        if self.bias is not None and not (math.isfinite(self.bias) and abs(self.bias - self.default_bias) <= 64):
            raise ValueError(f"bias must be finite and within 64 of the default {self.default_bias}, got {self.bias}")
        if not any(math.isfinite(v) and v > 0 for v in self._default_code_values()):
            raise ValueError(f"e{self.exp_bits}m{self.man_bits} with special={self.special!r} has no nonzero value")

    @property
    def name(self) -> str:
        base = f"e{self.exp_bits}m{self.man_bits}"
        if self.special != default_special(self.exp_bits, self.man_bits):
            base += f"[{self.special}]"
        return base if self.bias is None or self.bias == self.default_bias else f"{base}[bias={self.bias:g}]"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def default_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def scale(self) -> float:
        """``2^(default_bias - bias)`` rounded to 16 significant bits: the factor between this grid and the default
        one. Grid values have at most 8 significant bits, so every scaled grid value is exact in float32."""
        if self.bias is None:
            return 1.0
        m, e = math.frexp(2.0 ** (self.default_bias - self.bias))
        return math.ldexp(round(m * 2**16), e - 16)

    def with_bias(self, bias: float) -> FloatFormat:
        return FloatFormat(self.exp_bits, self.man_bits, bias, self.special)

    def _decode_default(self, code: int) -> float:
        e, m = self.exp_bits, self.man_bits
        sign = -1.0 if code >> (e + m) & 1 else 1.0
        p, f = code >> m & (2**e - 1), code & (2**m - 1)
        top = p == 2**e - 1
        if self.special == "ieee" and top:
            return sign * math.inf if f == 0 else math.nan
        if self.special == "fn" and top and f == 2**m - 1:
            return math.nan
        if p == 0:
            return sign * 2.0 ** (1 - self.default_bias) * f / 2**m
        return sign * 2.0 ** (p - self.default_bias) * (1 + f / 2**m)

    def _default_code_values(self) -> list[float]:
        return [self._decode_default(c) for c in range(2**self.bits)]

    @cached_property
    def grid(self) -> GridSpec:
        hi = max(v for v in (self._decode_default(c) for c in range(2 ** (self.bits - 1))) if math.isfinite(v))
        return GridSpec(-hi, hi, 1 - self.default_bias, self.man_bits, self.scale)

    @cached_property
    def _neg_zero_code(self) -> int | None:
        return 1 << (self.exp_bits + self.man_bits)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.default_bias - self.man_bits) * self.scale

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.default_bias) * self.scale

    @property
    def emax(self) -> int:
        """Exponent of the largest binade, ``floor(log2(max))`` (the OCP MX ``emax_elem``)."""
        return math.frexp(self.max)[1] - 1
