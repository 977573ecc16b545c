"""``PackedWeight``: the ``.weight`` of a frozen quantized layer, a tensor subclass over its packed codes and scales.

It reports the logical float weight (``shape``, ``dtype``, ``device``), so model code, peft, accelerate and
``named_parameters`` see an ordinary weight, while it stores only the tensors of :mod:`dmq.packed` (the torchao /
quanto pattern). Any operation on it other than moving it runs on its dequantized value (:meth:`dequantize`, bit
for bit the fake-quantized weight), so ``F.linear(x, w)`` or ``F.conv2d(x, w)`` on a bare packed weight computes
with the quantized weight; the layer itself picks an integer or FP8 GEMM where one applies (:mod:`dmq.kernels`).

- ``w.to(device)`` / ``.cuda()`` move the packed tensors; ``w.to(dtype)`` gives a plain dequantized tensor (as a
  cast of any weight gives a new tensor); a quantized layer refuses ``module.half()`` / ``.to(dtype)`` before
  touching anything (:class:`dmq.modules.PackedMixin`).
- In-place writes raise :class:`PackedWeightWriteError` before anything changes: a packed weight has no float
  storage. The one exception is a dense add / subtract (``w.data += d``, ``w.data -= d``: peft's ``merge`` /
  ``unmerge``, diffusers' ``fuse_lora`` / ``unfuse_lora``) on the weight of a quantized layer (``_owner``): it is
  handed to the layer, which keeps the delta in a 16-bit side branch beside the packed codes
  (:meth:`dmq.modules.PackedMixin.fuse_weight_delta`); the codes never change.
- ``element_size()`` is the packed bytes per logical element (fractional below 8 bits), so
  ``numel() * element_size()`` is the resident size and ``get_memory_footprint()`` counts what is stored.
- ``__tensor_flatten__`` / ``__tensor_unflatten__`` make it traceable: ``torch.compile(fullgraph=True)`` sees through
  it, and ``nn.Module._apply`` swaps it whole.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from dmq.packed import WeightLayout, dtype_from_name, gather_rows, unpack_weight

aten = torch.ops.aten


class PackedWeightWriteError(RuntimeError):
    """An in-place write into a packed weight (a ``RuntimeError``: torch turns a ``TypeError`` from ``w += d`` into
    a silent out-of-place ``w = w + d``)."""


def part_names(layouts: tuple[WeightLayout, ...]) -> list[str]:
    """State-dict names of every packed tensor: ``qweight``, ``weight_scale``, ... and ``_1`` for a second part."""
    return [k if i == 0 else f"{k}_{i}" for i, lay in enumerate(layouts) for k in lay.expected()]


def joined_shape(layouts: tuple[WeightLayout, ...]) -> tuple[int, ...]:
    """The logical weight shape of ``layouts`` (two parts are the halves of a split convolution, along dim 1)."""
    if len(layouts) == 1:
        return tuple(layouts[0].shape)
    a, b = layouts[0].shape, layouts[1].shape
    return (a[0], a[1] + b[1], *a[2:])


def weight_part(w: PackedWeight, i: int) -> dict[str, torch.Tensor]:
    """The tensors of part ``i`` of ``w`` by their base names. (Plain functions rather than methods of the subclass,
    here and in :func:`dequantize`: torch.compile inlines functions and reads the inner tensors as attributes.)"""
    sfx = "" if i == 0 else f"_{i}"
    return {k: getattr(w, k + sfx) for k in w.layouts[i].expected()}


def dequantize(w: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fake-quantized float weight of ``w``, bit for bit, in ``dtype`` (default: the logical dtype)."""
    dtype = w.dtype if dtype is None else dtype
    ws = [unpack_weight(weight_part(w, i), lay, dtype) for i, lay in enumerate(w.layouts)]
    return ws[0] if len(ws) == 1 else torch.cat(ws, dim=1)


def lookup(w: PackedWeight, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(w)[index]`` of a one-part packed table (an embedding), bit for bit, reading only the rows
    ``index`` selects (:func:`dmq.packed.gather_rows`)."""
    return gather_rows(weight_part(w, 0), w.layouts[0], index, w.dtype if dtype is None else dtype)


class PackedWeight(torch.Tensor):
    """A packed quantized weight; ``tensors`` maps :func:`part_names` to the stored tensors."""

    @staticmethod
    def __new__(cls, tensors: dict[str, torch.Tensor], layouts: tuple[WeightLayout, ...],
                dtype: torch.dtype | None = None, requires_grad: bool = False):
        layouts = tuple(layouts)
        dtype = dtype_from_name(layouts[0].dtype) if dtype is None else dtype
        dev = tensors["qweight"].device
        return torch.Tensor._make_wrapper_subclass(cls, joined_shape(layouts), dtype=dtype, device=dev,
                                                   requires_grad=requires_grad)

    def __init__(self, tensors: dict[str, torch.Tensor], layouts: tuple[WeightLayout, ...],
                 dtype: torch.dtype | None = None, requires_grad: bool = False):
        self.layouts = tuple(layouts)
        self._names = tuple(part_names(self.layouts))
        missing = [n for n in self._names if n not in tensors]
        if missing:
            raise ValueError(f"packed weight: tensors {missing} missing for layouts {[lay.format for lay in layouts]}")
        for n in self._names:
            setattr(self, n, tensors[n])
        self._owner = None  # weakref to the quantized layer that takes fused deltas (set by that layer)

    # ------------------------------------------------------------------------------------------- contents
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by state-dict name."""
        return {n: getattr(self, n) for n in self._names}

    def part(self, i: int) -> dict[str, torch.Tensor]:
        """The tensors of part ``i`` by their base names (``qweight``, ``weight_scale``, ...)."""
        return weight_part(self, i)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized float weight, bit for bit, in ``dtype`` (default: the logical dtype)."""
        return dequantize(self, dtype)

    @property
    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def element_size(self) -> float:  # type: ignore[override]
        n = self.numel()
        return self.packed_nbytes / n if n else 0.0

    def __repr__(self, *, tensor_contents=None) -> str:
        fmts = "+".join(lay.format for lay in self.layouts)
        return (f"PackedWeight({fmts}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"{self.packed_nbytes} bytes)")

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.tensors(), self.layouts, self.dtype)

    # ------------------------------------------------------------------------------------- compile support
    def __tensor_flatten__(self):
        return list(self._names), (self.layouts, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        layouts, dtype = ctx
        return PackedWeight(inner, layouts, dtype)

    def _with(self, fn) -> PackedWeight:
        out = PackedWeight({n: fn(t) for n, t in self.tensors().items()}, self.layouts, self.dtype)
        out._owner = self._owner  # an alias (``w.data``) or a moved copy still belongs to the layer
        return out

    # ----------------------------------------------------------------------------------------- dispatch
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _writes(func) and any(isinstance(a, PackedWeight) for a in args):
            raise PackedWeightWriteError(
                f"{func.__name__} would write into a dmq packed weight, which has no float storage: dequantize the "
                "layer (model.dequantize() / dmq.dequantize) to edit its weight")

        def unwrap(t):
            return t.dequantize() if isinstance(t, PackedWeight) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _writes(func) -> bool:
    """Whether the ATen op writes into one of its arguments (``add_``, ``copy_``, ``out=``...)."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _rebuild(tensors, layouts, dtype):
    return PackedWeight(tensors, layouts, dtype)


def _detach(w: PackedWeight) -> PackedWeight:
    return w._with(lambda t: t)


def _clone(w: PackedWeight, **kwargs) -> PackedWeight:
    return w._with(torch.clone)


def _to_copy(w: PackedWeight, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if dtype is not None and dtype != w.dtype:
        # a cast of a weight is a new float tensor: the dequantized weight in that dtype
        out = w.dequantize(dtype)
        return out if device is None else out.to(device, non_blocking=non_blocking)
    if device is None:
        return w._with(lambda t: t)
    return w._with(lambda t: t.to(device, non_blocking=non_blocking))


def _copy_(dst: PackedWeight, src, non_blocking=False):
    if not isinstance(dst, PackedWeight) or not isinstance(src, PackedWeight) or dst.layouts != src.layouts:
        raise TypeError("a dmq packed weight can only be overwritten by a packed weight of the same layout")
    for n in dst._names:
        getattr(dst, n).copy_(getattr(src, n), non_blocking=non_blocking)
    return dst


def _fused_write(sign: int):
    def handler(w, other, alpha=1):
        owner = w._owner() if isinstance(w, PackedWeight) and w._owner is not None else None
        if owner is None or not isinstance(other, torch.Tensor) or isinstance(other, PackedWeight):
            raise PackedWeightWriteError(
                "an in-place add into a dmq packed weight that belongs to no quantized layer (or of a packed "
                "operand): dequantize the layer (model.dequantize() / dmq.dequantize) to edit its weight")
        delta = other if alpha == 1 else other * alpha
        (owner.fuse_weight_delta if sign > 0 else owner.unfuse_weight_delta)(delta)
        return w
    return handler


def _is_same_size(a, b):
    return tuple(a.shape) == tuple(b.shape)


_HANDLERS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.is_same_size.default: _is_same_size,
    aten.add_.Tensor: _fused_write(1),
    aten.sub_.Tensor: _fused_write(-1),
}
