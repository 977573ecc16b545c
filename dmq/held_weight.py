"""The fake-quantized weight a quantized layer holds until :func:`dmq.freeze` (``weight_fq``, built on first use):
packed codes and scales, built a few rows at a time.

Held dense, ``weight_fq`` would double a model between quantize and freeze (float weight plus its quantized copy,
in the same dtype). Held as a :class:`~dmq.packed_weight.PackedWeight` it adds about a quarter at 4 bits, and
:func:`dmq.freeze` keeps those very tensors (and releases the float weight). Quantizing and packing work in
float32 / float64 with int64 indices (20-50 bytes per element): done on row chunks of :data:`CHUNK` elements, that
working set stays a few MB instead of a fraction of the model for its largest layer (docs/memory.md).
"""

from __future__ import annotations

import dataclasses

import torch

from dmq import formats
from dmq.config import QuantSpec
from dmq.fake_quant import quantize_weight
from dmq.formats.grid import work_dtype
from dmq.packed import WeightLayout, dtype_name, pack_weight, smallest_exact_dtype
from dmq.packed_weight import PackedWeight, dequantize

CHUNK = 1 << 18  # elements per row chunk of the quantize / pack work


def rtn(w: torch.Tensor, spec: QuantSpec | None, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``w`` (no spec: ``w`` itself, an alias; a held weight is only ever
    replaced, never written in place)."""
    if spec is None:
        return w.detach()
    return quantize_weight(w, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator, amax)


def rtn_split(w: torch.Tensor, spec: QuantSpec | None, split: int | None) -> torch.Tensor:
    """:func:`rtn` of each half of a split convolution's input channels (Q-Diffusion's shortcut split)."""
    if split is None or spec is None:
        return rtn(w, spec)
    return torch.cat([rtn(w[:, :split], spec), rtn(w[:, split:], spec)], dim=1)


def held(w: torch.Tensor, spec: QuantSpec | None, split: int | None = None,
         target: torch.Tensor | None = None) -> torch.Tensor:
    """What a layer holds as ``weight_fq`` for the quantized weight ``target`` (default: round-to-nearest of ``w``),
    whose scales are searched on the float weight ``w``: packed when ``target`` lies on that grid, bit for bit;
    else ``target`` itself (no weight format, weights on the meta device, a differentiable or off-grid value such
    as a reference run's float weight)."""
    if spec is None or w.device.type == "meta" or (target is not None and target.requires_grad):
        return rtn_split(w, spec, split) if target is None else target
    cuts = [slice(None)] if split is None else [slice(None, split), slice(split, None)]
    layouts, tensors = [], {}
    with torch.no_grad():
        try:
            for i, c in enumerate(cuts):
                t, layout = _pack_rows(w.detach()[:, c], spec, None if target is None else target.detach()[:, c])
                layouts.append(layout)
                tensors.update({k if i == 0 else f"{k}_{i}": v for k, v in t.items()})
        except ValueError:  # off the grid of its scales
            return rtn_split(w, spec, split) if target is None else target
    return PackedWeight(tensors, tuple(layouts), w.dtype if target is None else target.dtype)


def dense(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A weight as a plain tensor (a packed one dequantized), in ``dtype`` if given."""
    if isinstance(w, PackedWeight):
        return dequantize(w, dtype)
    return w if dtype is None else w.to(dtype)


def _tensor_amax(w: torch.Tensor, rows: int) -> torch.Tensor:
    """NVFP4's tensor amax of ``w``, as :class:`~dmq.formats.block.NVFP4Format` computes it, chunk by chunk."""
    amax = torch.zeros((), dtype=work_dtype(w.dtype))
    for r0 in range(0, w.shape[0], rows):
        c = w[r0:r0 + rows].reshape(-1).to(work_dtype(w.dtype))
        amax = torch.maximum(amax, c.abs().nan_to_num_(nan=0.0, posinf=0.0).amax())
    return amax


def _pack_rows(w: torch.Tensor, spec: QuantSpec, target: torch.Tensor | None
               ) -> tuple[dict[str, torch.Tensor], WeightLayout]:
    """:func:`dmq.packed.pack_weight` of ``w`` (and ``target``, default round-to-nearest), row chunk by row chunk:
    every format's scales are per row or per block of a row, but NVFP4's tensor scale and per-tensor INT, which
    see the whole weight (the amax is taken first for NVFP4; per-tensor INT is packed whole)."""
    fmt = spec.fmt
    rows = max(1, CHUNK // max(1, w[0].numel()))
    if w.shape[0] <= rows or (not fmt.is_block and spec.granularity == "tensor"):
        return pack_weight(w, spec, rtn(w, spec) if target is None else target)
    amax = _tensor_amax(w, rows) if isinstance(fmt, formats.NVFP4Format) else None
    # codes go straight into their final tensors: chunk-sized pieces kept for a concatenation would fragment the
    # heap between long-lived tensors (measured: 0.4x of the model left resident by glibc)
    tensors, scales, layout = {}, [], None
    for r0 in range(0, w.shape[0], rows):
        wc = w[r0:r0 + rows]
        tc = rtn(wc, spec, amax) if target is None else target[r0:r0 + rows]
        t, lay = pack_weight(wc, spec, tc, amax)
        layout = layout or dataclasses.replace(lay, shape=tuple(w.shape))
        scales.append((t.pop("weight_scale"), lay.scale_dtype))
        for k, v in t.items():
            if v.ndim == 0:  # NVFP4's tensor scale: one for all chunks
                tensors[k] = v
                continue
            if k not in tensors:
                tensors[k] = v.new_empty((w.shape[0], *v.shape[1:]))
            tensors[k][r0:r0 + v.shape[0]] = v
    if len({d for _, d in scales}) > 1:  # each chunk stored its scales in its own smallest exact dtype: one for all
        s = torch.cat([t.float() for t, _ in scales])
        dt = smallest_exact_dtype(s)
        tensors["weight_scale"], layout = s.to(dt), dataclasses.replace(layout, scale_dtype=dtype_name(dt))
    else:
        tensors["weight_scale"] = torch.cat([t for t, _ in scales])
    return tensors, layout
