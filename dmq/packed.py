"""Packed weights: the storage of a frozen quantized layer, and its exact dequantization.

:func:`pack_weight` turns a weight and its :class:`~dmq.config.QuantSpec` into a few small tensors plus a
JSON-serialisable :class:`WeightLayout`:

- ``qweight``: the element codes, one row per output channel. 8-bit INT codes are ``int8`` (``uint8`` for an
  asymmetric grid); FP8 codes are ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``; every narrower code is packed
  densely by :func:`dmq.formats.pack` (4-bit two per byte, 6-bit four per three bytes, ...), row by row.
- ``weight_scale``: one scale per group (channel, group or tensor) in the smallest float dtype that holds every
  scale exactly (float16, bfloat16 or float32); MX block scales as E8M0 bytes (``uint8``), NVFP4 block scales as
  ``torch.float8_e4m3fn``.
- ``weight_zero_point`` (asymmetric INT, as ``uint8``) and ``weight_scale2`` (NVFP4's FP32 tensor scale).

:func:`unpack_weight` recomputes the fake-quantized weight bit for bit: the same products in the same dtype as
:func:`dmq.fake_quant.quantize_weight` (element formats) or the block format's ``quantize``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

from dmq import formats, native
from dmq.config import QuantSpec
from dmq.fake_quant import grouped, weight_qparams
from dmq.formats.grid import DISABLED

logger = logging.getLogger(__name__)

FLOAT8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.float8_e4m3fn,
    torch.float8_e5m2)}


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class WeightLayout:
    """How one packed weight (or one half of a split convolution's weight) is stored.

    ``shape`` is the float weight's shape; ``rows x cols`` its 2-D view (output channels x reduction);
    ``padded_cols`` the row length the codes cover (group padding); ``storage`` is ``"int8"``, ``"uint8"``,
    ``"float8_e4m3fn"``, ``"float8_e5m2"`` or ``"packed<bits>"``.
    """

    format: str
    granularity: str
    group_size: int
    symmetric: bool
    shape: tuple[int, ...]
    dtype: str
    storage: str
    padded_cols: int
    scale_dtype: str

    @property
    def fmt(self) -> formats.Format:
        return formats.get(self.format)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WeightLayout:
        try:
            lay = cls(**{**d, "shape": tuple(int(s) for s in d["shape"])})
        except (TypeError, KeyError) as e:
            raise ValueError(f"bad weight layout {d!r}: {e}") from None
        lay.fmt  # noqa: B018 -- ValueError listing the valid formats
        dtype_from_name(lay.dtype)
        dtype_from_name(lay.scale_dtype)
        return lay

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor of this layout, by buffer name (without the part suffix)."""
        fmt, r = self.fmt, self.rows
        out = {"qweight": ((r, _row_bytes(self.padded_cols, self.bits, self.storage)), _storage_dtype(self.storage))}
        if fmt.is_block:
            nb = self.padded_cols // fmt.block_size
            out["weight_scale"] = ((r, nb), dtype_from_name(self.scale_dtype))
            if isinstance(fmt, formats.NVFP4Format):
                out["weight_scale2"] = ((), torch.float32)
            return out
        groups = {"tensor": (1, 1), "group": (r, self.padded_cols // self.group_size)}.get(self.granularity, (r, 1))
        out["weight_scale"] = (groups, dtype_from_name(self.scale_dtype))
        if not self.symmetric:
            out["weight_zero_point"] = (groups, torch.uint8)
        return out


def _storage_dtype(storage: str) -> torch.dtype:
    return torch.uint8 if storage.startswith("packed") else dtype_from_name(storage)


def _row_bytes(padded_cols: int, bits: int, storage: str) -> int:
    # packed rows are padded to a multiple of 8 codes, which always fills whole bytes (see _store_codes)
    return padded_cols if not storage.startswith("packed") else formats.packed_nbytes(_pad_to(padded_cols, 8), bits)


def _pad_to(n: int, k: int) -> int:
    return n + (-n % k)


def smallest_exact_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest of float16, bfloat16, float32 that holds every value of ``t`` exactly."""
    for d in SCALE_DTYPES:
        back = t.to(d).to(t.dtype)
        if torch.equal(back, t):
            return d
    return torch.float32


def _storage(fmt: formats.Format) -> str:
    elem = fmt.element if fmt.is_block else fmt
    if isinstance(elem, formats.FloatFormat) and not fmt.is_block and elem.name in FLOAT8:
        return dtype_name(FLOAT8[elem.name])
    if elem.bits == 8:
        return "int8" if isinstance(elem, formats.IntFormat) and elem.signed else "uint8"
    return f"packed{elem.bits}"


def _store_codes(codes: torch.Tensor, storage: str, bits: int) -> torch.Tensor:
    """``(R, C)`` uint8 codes -> the stored tensor (rows packed independently)."""
    if not storage.startswith("packed"):
        return codes.contiguous().view(_storage_dtype(storage))
    r, c = codes.shape
    per = 8  # eight codes always fill whole bytes, whatever the width
    if c % per:
        codes = torch.nn.functional.pad(codes, (0, -c % per))
    return formats.pack(codes, bits).reshape(r, -1)


def unpack_codes(q: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """The stored tensor -> ``(R, padded_cols)`` uint8 codes."""
    bits, c = layout.bits, layout.padded_cols
    if not layout.storage.startswith("packed"):
        return q.view(torch.uint8)
    r = q.shape[0]
    if bits == 4:
        out = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(r, -1)
    elif bits == 2:
        out = torch.stack([q & 3, q >> 2 & 3, q >> 4 & 3, q >> 6], dim=-1).reshape(r, -1)
    elif bits == 6:
        b = q.reshape(r, -1, 3)
        b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
        out = torch.stack([b0 & 63, b0 >> 6 | (b1 & 15) << 2, b1 >> 4 | (b2 & 3) << 4, b2 >> 2], -1).reshape(r, -1)
    else:
        out = formats.unpack(q.reshape(-1), bits, q.numel() * 8 // bits).reshape(r, -1).to(torch.uint8)
    return out[:, :c]


@lru_cache(maxsize=64)
def _lut(fmt_name: str, device: str) -> torch.Tensor:
    fmt = formats.get(fmt_name)
    elem = fmt.element if fmt.is_block else fmt
    return elem._lut.to(torch.float32).to(device)


def code_values(codes: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """Unscaled grid values of ``(R, C)`` uint8 codes, float32."""
    fmt = layout.fmt
    if layout.storage == "int8":
        return codes.view(torch.int8).to(torch.float32)
    if layout.storage == "uint8" and isinstance(fmt, formats.IntFormat):
        return codes.to(torch.float32)
    if isinstance(fmt, formats.IntFormat) and fmt.signed and layout.bits == 4:
        # two's complement nibble: shift it to the top of an int8 and back to sign-extend
        return ((codes.view(torch.int8) << 4) >> 4).to(torch.float32)
    lut = _lut(fmt.name, str(codes.device))
    return lut.index_select(0, codes.reshape(-1).int()).reshape(codes.shape)


def int_codes(tensors: dict[str, torch.Tensor], layout: WeightLayout) -> torch.Tensor:
    """Signed INT codes as an ``(R, cols)`` int8 tensor, for integer GEMMs."""
    q = tensors["qweight"]
    if layout.storage == "int8":
        return q[:, : layout.cols] if layout.padded_cols != layout.cols else q
    if (layout.storage == "packed4" and "native16" not in DISABLED and q.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        out = native.unpack_s4(q.view(torch.uint8), layout.cols)
        if out is not None:
            return out
    codes = unpack_codes(q, layout)[:, : layout.cols]
    b = layout.bits
    v = codes.view(torch.int8)
    return (v << (8 - b)) >> (8 - b)  # sign-extend the b-bit two's complement code


def pack_weight(w: torch.Tensor, spec: QuantSpec, target: torch.Tensor | None = None,
                tensor_amax: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], WeightLayout]:
    """Codes and scales of ``w`` quantized by ``spec`` (the static weight search of :mod:`dmq.fake_quant`).

    ``w`` is the float weight the scales are searched on, ``target`` the fake-quantized weight the layer computes
    with (its dtype is the layout's). ``target`` is checked to round trip bit for bit; when rounding ``w`` does not
    give it (learned rounding, GPTQ), the codes are taken from ``target`` itself on the same scales. A weight that
    is not on its grid raises ``ValueError``. ``tensor_amax``: the whole weight's, for NVFP4 on a slice of rows.
    """
    fmt = spec.fmt
    rows = w.detach().reshape(w.shape[0], -1)
    storage = _storage(fmt)
    if fmt.is_block:
        layout, tensors = _pack_block(rows, fmt, w, storage, w.dtype if target is None else target.dtype,
                                      tensor_amax)
        if target is not None and not _same(unpack_weight(tensors, layout), target):
            tensors["qweight"] = _block_codes_of(target.detach().reshape(rows.shape), tensors, layout)
    else:
        g, scale, zp = weight_qparams(w, fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)
        sd = smallest_exact_dtype(scale)
        dt = w.dtype if target is None else target.dtype
        layout = WeightLayout(fmt.name, spec.granularity, spec.group_size, spec.symmetric, tuple(w.shape),
                              dtype_name(dt), storage, _padded(rows.shape[1], spec), dtype_name(sd))
        tensors = _pack_element(g, scale, zp, fmt, layout)
        if target is not None and not _same(unpack_weight(tensors, layout), target):
            tg = grouped(target.detach().reshape(rows.shape).float(), spec.granularity, spec.group_size)
            tensors = _pack_element(tg, scale, zp, fmt, layout)
    if target is not None and not _same(unpack_weight(tensors, layout), target):
        raise ValueError(f"the quantized weight is not on the {fmt.name} grid of its scales: cannot pack it exactly")
    return tensors, layout


def _padded(cols: int, spec: QuantSpec) -> int:
    return _pad_to(cols, spec.group_size) if spec.granularity == "group" else cols


def _pack_element(g: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, fmt: formats.Format,
                  layout: WeightLayout) -> dict[str, torch.Tensor]:
    x = g / scale if zp is None else g / scale + zp
    codes = fmt.encode(x).reshape(layout.rows, layout.padded_cols)
    gshape = scale.shape[:2]
    out = {"qweight": _store_codes(codes, layout.storage, fmt.bits),
           "weight_scale": scale.reshape(gshape).to(dtype_from_name(layout.scale_dtype))}
    if zp is not None:
        out["weight_zero_point"] = zp.reshape(gshape).to(torch.uint8)
    return out


def _pack_block(rows: torch.Tensor, fmt: formats.Format, w: torch.Tensor, storage: str, dtype: torch.dtype,
                tensor_amax: torch.Tensor | None = None) -> tuple[WeightLayout, dict[str, torch.Tensor]]:
    padded = _pad_to(rows.shape[1], fmt.block_size)
    if isinstance(fmt, formats.NVFP4Format):
        codes, sb, st = fmt.encode(rows, dim=-1, tensor_amax=tensor_amax)
        scales, sdt = sb.view(torch.float8_e4m3fn), torch.float8_e4m3fn
    else:
        codes, scales = fmt.encode(rows, dim=-1)
        st, sdt = None, torch.uint8
    layout = WeightLayout(fmt.name, "block", fmt.block_size, True, tuple(w.shape), dtype_name(dtype), storage,
                          padded, dtype_name(sdt))
    tensors = {"qweight": _store_codes(codes.reshape(rows.shape[0], padded), storage, fmt.bits),
               "weight_scale": scales.contiguous()}
    if st is not None:
        tensors["weight_scale2"] = st.reshape(())
    return layout, tensors


def _block_codes_of(target: torch.Tensor, tensors: dict[str, torch.Tensor], layout: WeightLayout) -> torch.Tensor:
    """Stored codes of ``target`` rows on the block scales already in ``tensors`` (learned rounding)."""
    fmt = layout.fmt
    r = target.shape[0]
    blocks = torch.nn.functional.pad(target.float(), (0, layout.padded_cols - target.shape[1]))
    blocks = blocks.reshape(r, -1, fmt.block_size)
    sc = tensors["weight_scale"]
    if isinstance(fmt, formats.NVFP4Format):
        denom = sc.to(torch.float32).unsqueeze(-1) * tensors["weight_scale2"].to(torch.float32)
    else:
        e = sc.to(torch.int32).unsqueeze(-1) - 127
        denom = torch.ldexp(torch.ones(e.shape, dtype=torch.float32), e)
    codes = fmt.element.encode(blocks / denom).reshape(r, layout.padded_cols)
    return _store_codes(codes, layout.storage, fmt.bits)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (a signed zero counts as zero: INT codes have no -0, and x * -0 == x * +0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0), b.masked_fill(nb, 0))


# rows are dequantized in chunks of about this many elements, so every pass of the dequantization stays in cache
CHUNK_ELEMS = 1 << 19


@lru_cache(maxsize=64)
def _byte_lut(fmt_name: str, device: str) -> torch.Tensor:
    """``(256, 2)`` float32: the values of the low and the high 4-bit code of every byte."""
    lut = _lut(fmt_name, device)
    b = torch.arange(256, device=device)
    return torch.stack([lut[b & 15], lut[b >> 4]], dim=-1)


def _row_values(q: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """Unscaled grid values of stored rows ``q``, float32 ``(rows, padded_cols)``."""
    if layout.storage == "packed4":
        fmt = layout.fmt
        if isinstance(fmt, formats.IntFormat) and fmt.signed:  # sign-extend each nibble with two int8 shifts
            v = q.view(torch.int8)
            vals = torch.stack([(v << 4) >> 4, v >> 4], dim=-1).to(torch.float32)
        else:  # one lookup per byte gives both of its codes' values
            vals = _byte_lut(fmt.name, str(q.device)).index_select(0, q.reshape(-1).int())
        return vals.reshape(q.shape[0], -1)[:, : layout.padded_cols]
    if layout.storage.startswith("float8"):  # FP8 codes are their own values (and convert traceably)
        return q.to(torch.float32)
    return code_values(unpack_codes(q, layout), layout)


def _dequant_rows(tensors: dict[str, torch.Tensor], layout: WeightLayout, r0: int, r1: int) -> torch.Tensor:
    fmt = layout.fmt
    n = r1 - r0
    vals = _row_values(tensors["qweight"][r0:r1], layout)
    if fmt.is_block:
        blocks = vals.reshape(n, -1, fmt.block_size)
        sc = tensors["weight_scale"][r0:r1]
        if isinstance(fmt, formats.NVFP4Format):
            s_t = tensors["weight_scale2"].to(torch.float32)
            # s_t = 0 (an all-zero weight) gives zeros whatever the block scales hold; branch-free for torch.compile
            out = torch.where(s_t == 0, blocks * 0.0, blocks * (sc.to(torch.float32).unsqueeze(-1) * s_t))
            return out.reshape(n, -1)
        work = torch.float64 if layout.dtype == "float64" else torch.float32
        e = sc.to(torch.int32).unsqueeze(-1) - 127
        return (blocks.to(work) * torch.ldexp(torch.ones(e.shape, dtype=work, device=e.device), e)).reshape(n, -1)
    scale = tensors["weight_scale"]
    scale = (scale[r0:r1] if scale.shape[0] > 1 else scale).to(torch.float32)
    ng = scale.shape[1] if layout.granularity == "group" else 1
    blocks = vals.reshape(n, ng, -1)
    zp = tensors.get("weight_zero_point")
    if zp is not None:
        zp = zp[r0:r1] if zp.shape[0] > 1 else zp
        blocks = blocks - zp.to(torch.float32).unsqueeze(-1)
    return (blocks * scale.unsqueeze(-1)).reshape(n, -1)


class RowDequantizer:
    """Rows of one packed weight in a single lookup pass and a single scale pass, for the tiled GEMM.

    Every stored byte indexes a 256-entry float32 table of its code value (two values per byte for 4-bit codes), so
    FP8, FP4, MX, NVFP4 and INT codes alike cost one ``index_select``; then every element is multiplied by its
    group's float32 scale (the NVFP4 block scale times its tensor scale, the MX power of two, the INT/FP group or
    channel scale), converted per tile, so the layer holds no extra copy. ``rows(r0, r1)`` is bit for bit
    :func:`_dequant_rows`: the same float32 values times the same float32 scales. Built by :func:`row_dequantizer`,
    which declines the layouts it does not cover.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], table: torch.Tensor, layout: WeightLayout) -> None:
        self.codes = tensors["qweight"].view(torch.uint8)  # indexed by the stored byte
        # an INT8 / UINT8 code is its own value: one widening cast instead of the index conversion and the gather
        # (the widening is vectorized, the gather is not: about 4x faster on a 512 x 1152 tile here)
        self.direct = None
        if layout.storage == "int8":
            self.direct = tensors["qweight"].view(torch.int8)
        elif layout.storage == "uint8" and isinstance(layout.fmt, formats.IntFormat):
            self.direct = self.codes
        # a (256, 2) table of both nibbles' values is looked up as one 8-byte word per byte: a 1-D index_select,
        # about 5x faster here than gathering 2-element rows, with the same bits
        self.pairs = table.dim() == 2
        self.table = table.contiguous().view(torch.int64).reshape(256) if self.pairs else table
        # the fused C loop (dmq.native, path native16) reads a 4-bit byte's two values from its nibbles' table
        self.values = table.contiguous()
        self.native = not self.pairs or bool(
            torch.equal(table[:, 0], table[:16, 0].repeat(16))
            and torch.equal(table[:, 1], table[::16, 1].repeat_interleave(16)))
        self.layout = layout
        self.sc, self.s_t = tensors["weight_scale"], tensors.get("weight_scale2")
        self.group = layout.padded_cols // self.sc.shape[1]

    def scales(self, r0: int, r1: int) -> torch.Tensor:
        """float32 ``(r1 - r0, groups)`` scales of rows ``r0:r1``, the products :func:`_dequant_rows` forms."""
        fmt, sc = self.layout.fmt, self.sc
        if isinstance(fmt, formats.NVFP4Format):
            s = sc[r0:r1].to(torch.float32)
            # an all-zero weight has s_t = 0: zeros whatever the block scales hold (FP4 values are finite)
            return s.mul_(self.s_t.to(torch.float32)) if float(self.s_t) != 0 else s.zero_()
        if fmt.is_block:
            e = sc[r0:r1].to(torch.int32) - 127
            return torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)
        return (sc[r0:r1] if sc.shape[0] > 1 else sc).to(torch.float32)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """float32 rows ``r0:r1``, ``(r1 - r0, cols)``."""
        n, padded, cols = r1 - r0, self.layout.padded_cols, self.layout.cols
        if self.direct is not None:
            v = self.direct[r0:r1].to(torch.float32)
        else:
            v = self.table.index_select(0, self.codes[r0:r1].reshape(-1).to(torch.int32))
            v = (v.view(torch.float32) if self.pairs else v).reshape(n, -1)
        if v.shape[1] != padded:  # 4-bit rows are stored padded to whole bytes of 8 codes
            v = v[:, :padded].contiguous()
        v = v.reshape(n, -1, self.group).mul_(self.scales(r0, r1).unsqueeze(-1)).reshape(n, padded)
        return v if cols == padded else v[:, :cols]

    def gemv(self, x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``x W^T + bias`` in float32 for a few float32 input rows, ``W`` every row of :meth:`rows_in` (``dtype``,
        held in float32), without building a tile (``dmq.native.dequant_gemv``); None where it does not apply."""
        if not self.native or "native16" in DISABLED or self.codes.device.type != "cpu":
            return None
        n = self.layout.rows
        codes, table = self._native_codes()
        return native.dequant_gemv(x, codes, table, self.scales(0, n).expand(n, -1).contiguous(), self.group, bias,
                                   dtype)

    def _native_codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The codes and value table ``dmq.native`` reads: INT8 / UINT8 codes as their own values (no table)."""
        return (self.direct, None) if self.direct is not None else (self.codes, self.values)

    def rows_in(self, r0: int, r1: int, dtype: torch.dtype, gemm_dtype: torch.dtype) -> torch.Tensor:
        """Rows ``r0:r1`` rounded to ``dtype`` (the reference's weight) and held in ``gemm_dtype``: bit for bit
        ``rows(r0, r1).to(dtype).to(gemm_dtype)``.

        With one scale per row and rows much longer than the 256-entry table (FP8 and FP4 weights per output
        channel, from 512 stored bytes a row on), each row's table is scaled and rounded first, ``256`` products per
        row instead of one per element, and the codes index the tile's tables directly: one gather replaces the
        gather, the scale pass and the two casts (the product ``table[code] * s`` is the same float32 product)."""
        n, padded, cols = r1 - r0, self.layout.padded_cols, self.layout.cols
        if self.native and "native16" not in DISABLED and self.codes.device.type == "cpu":
            sc = self.scales(r0, r1)
            codes, table = self._native_codes()
            out = native.dequant_rows(codes[r0:r1], table, sc.expand(n, -1).contiguous(), self.group, cols, dtype,
                                      gemm_dtype)
            if out is not None:
                return out
        per_row = self.sc.shape[1] == 1 and not self.layout.fmt.is_block and self.direct is None
        if not per_row or self.codes.shape[1] < 512:
            return self.rows(r0, r1).to(dtype).to(gemm_dtype)
        table = self.table.view(torch.float32).reshape(256, -1)  # (256, 1), or (256, 2) for both nibbles
        s = self.scales(r0, r1).reshape(-1, 1, 1).expand(n, 1, 1)
        tables = (table.unsqueeze(0) * s).to(dtype).to(gemm_dtype).contiguous()  # (n, 256, 1 or 2)
        # both nibbles' values of a byte as one word (see __init__)
        word = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tables.shape[-1] * gemm_dtype.itemsize]
        idx = self.codes[r0:r1].to(torch.int32)
        idx += torch.arange(0, n * 256, 256, dtype=torch.int32, device=idx.device).unsqueeze(1)
        v = tables.view(word).reshape(-1).index_select(0, idx.reshape(-1)).view(gemm_dtype).reshape(n, -1)
        if v.shape[1] != padded:
            v = v[:, :padded]
        return v if cols == padded else v[:, :cols]


def row_dequantizer(tensors: dict[str, torch.Tensor], layout: WeightLayout) -> RowDequantizer | None:
    """A :class:`RowDequantizer` for ``layout``, or ``None`` for the layouts it does not cover (zero points,
    6/3/2-bit packing, float64 block weights), which keep :func:`_dequant_rows`."""
    fmt, storage = layout.fmt, layout.storage
    if "weight_zero_point" in tensors or layout.dtype == "float64":
        return None
    q = tensors["qweight"]
    every = torch.arange(256, dtype=torch.uint8, device=q.device)
    if storage == "int8":
        table = every.view(torch.int8).to(torch.float32)
    elif storage.startswith("float8"):
        table = every.view(_storage_dtype(storage)).to(torch.float32)
    elif storage == "uint8":
        table = every.to(torch.float32) if isinstance(fmt, formats.IntFormat) else _lut(fmt.name, str(q.device))
    elif storage == "packed4":
        if isinstance(fmt, formats.IntFormat) and fmt.signed:
            v = every.view(torch.int8)
            table = torch.stack([(v << 4) >> 4, v >> 4], dim=-1).to(torch.float32)
        else:
            table = _byte_lut(fmt.name, str(q.device))
    else:
        return None
    if layout.padded_cols % tensors["weight_scale"].shape[1]:
        return None
    return RowDequantizer(tensors, table.contiguous(), layout)


def unpack_weight(tensors: dict[str, torch.Tensor], layout: WeightLayout, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """The fake-quantized weight, bit for bit, in ``dtype`` (default: the original weight's dtype).

    Computed in float32 (float64 for a float64 block-format weight) like the fake-quant path, then cast once; in
    chunks of rows, so that no full float32 copy of the layer exists besides the result.
    """
    out_dtype = dtype_from_name(layout.dtype) if dtype is None else dtype
    r, cols = layout.rows, layout.cols
    out = torch.empty(r, cols, dtype=out_dtype, device=tensors["qweight"].device)
    step = max(1, CHUNK_ELEMS // layout.padded_cols)
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        out[r0:r1] = _dequant_rows(tensors, layout, r0, r1)[:, :cols]
    return out.reshape(layout.shape)


def gather_rows(tensors: dict[str, torch.Tensor], layout: WeightLayout, index: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``index`` (any shape, int64) of the packed weight, dequantized: ``(*index.shape, cols)``, bit for bit the
    same rows of :func:`unpack_weight` (the same float32 products, one cast). Only the selected rows' codes, scales
    and zero points are read: an embedding lookup never dequantizes the whole table."""
    out_dtype = dtype_from_name(layout.dtype) if dtype is None else dtype
    flat = index.reshape(-1)
    # per-row tensors (codes, group / channel / block scales, zero points) are gathered; a tensor scale is shared
    sub = {k: t.index_select(0, flat) if t.dim() and t.shape[0] == layout.rows else t for k, t in tensors.items()}
    rows = _dequant_rows(sub, layout, 0, flat.shape[0])[:, : layout.cols]
    return rows.to(out_dtype).reshape(*index.shape, layout.cols)


def weight_bytes(model: nn.Module) -> dict[str, float]:
    """Resident bytes of a model's weights: packed quantized weights (codes, scales, zero points) against the
    parameters they replace, and every other parameter and persistent buffer.

    Returns ``quantized_params``, ``quantized_bytes``, ``bytes_per_param`` (of the quantized layers), ``other_bytes``
    (float layers left in full precision, quantizer state) and ``total_bytes``.
    """
    qparams, qbytes, total = 0, 0, 0
    for mod in model.modules():
        w = mod._parameters.get("weight")
        if hasattr(w, "packed_nbytes"):  # a dmq.packed_weight.PackedWeight
            qparams += w.numel()
            qbytes += w.packed_nbytes
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += getattr(t, "packed_nbytes", t.numel() * t.element_size())
    return {"quantized_params": qparams, "quantized_bytes": qbytes,
            "bytes_per_param": qbytes / qparams if qparams else float("nan"), "other_bytes": total - qbytes,
            "total_bytes": total}
