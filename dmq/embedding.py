"""Quantized embedding tables: :class:`QuantEmbedding`, the ``nn.Embedding`` of a class / label embedder with a
weight-only packed table.

A table ``E`` of shape ``(num_embeddings, embedding_dim)`` is stored like a Linear weight (:mod:`dmq.packed`): one
row per entry, its scales group- or block-wise along the embedding dimension, so each row is quantized on its own
(a row is one sample's conditioning vector). A lookup gathers the selected rows' codes and scales and dequantizes
only those rows (:func:`dmq.packed.gather_rows`), bit for bit the rows of the dequantized table. There is no matmul
and no activation to quantize, and the one-hot input makes GPTQ's Hessian diagonal (GPTQ is round-to-nearest here),
so the table is quantized by round-to-nearest with the spec's range search at :func:`dmq.quantize`.

The module stays an ``nn.Embedding`` with a ``.weight`` (a :class:`~dmq.packed_weight.PackedWeight` once frozen),
and follows the life cycle of :class:`~dmq.modules.QuantLinear`: float table during calibration, the held packed
table (``weight_fq``) until :func:`dmq.freeze`, then the packed ``weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmq.calibration import CONTEXT
from dmq.config import QuantSpec
from dmq.modules import PackedMixin, _float_weight, _plus, _register_empty_method_state
from dmq.packed import WeightLayout
from dmq.packed_weight import PackedWeight, lookup

_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def quantizable(mod: nn.Module) -> bool:
    """A plain ``nn.Embedding`` whose table is fixed: ``max_norm`` renormalises the looked-up rows in place at every
    call, which a packed table cannot follow (such tables stay in full precision)."""
    return type(mod) is nn.Embedding and mod.max_norm is None


def _lookup(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if isinstance(w, PackedWeight):
        return lookup(w, index)
    return F.embedding(index, w)


class QuantEmbedding(PackedMixin, nn.Embedding):
    """``y = Q(E)[index]``: an embedding lookup in a weight-only quantized table."""

    @classmethod
    def _skeleton(cls, mod: nn.Embedding, spec: QuantSpec | None) -> QuantEmbedding:
        if not quantizable(mod):
            raise ValueError(f"QuantEmbedding needs a plain nn.Embedding without max_norm, got {mod!r}")
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in _ATTRS:
            setattr(q, attr, getattr(mod, attr))
        q.weight = mod.weight
        q.weight_spec = spec
        return q

    @classmethod
    def from_float(cls, mod: nn.Embedding, spec: QuantSpec) -> QuantEmbedding:
        """The table ``mod.weight`` quantized by ``spec`` (round-to-nearest, held packed from first use until
        :func:`dmq.freeze`)."""
        if not isinstance(spec, QuantSpec) or spec.dynamic or spec.granularity == "token":
            raise ValueError(f"embedding table spec: a static weight QuantSpec with granularity 'tensor', 'channel', "
                             f"'group' or 'block', got {spec!r}")
        q = cls._skeleton(mod, spec)
        q.register_buffer("weight_fq", None, persistent=False)  # built on first use: PackedMixin.weight_fq
        _register_empty_method_state(q)
        return q

    @classmethod
    def from_packed(cls, mod: nn.Embedding, weight_spec: QuantSpec | None, layouts: list[WeightLayout],
                    device: torch.device | str | None = None) -> QuantEmbedding:
        """A packed table with empty tensors shaped by ``layouts``, to load a saved state into."""
        if len(layouts) != 1:
            raise ValueError(f"an embedding table is stored as one packed part, the map gives {len(layouts)}")
        q = cls._skeleton(mod, weight_spec)
        _register_empty_method_state(q)
        q.set_packed(layouts, device=mod.weight.device if device is None else device)
        return q

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def fused_branch(self, x: torch.Tensor) -> torch.Tensor | float:
        """The rows ``x`` of the fused LoRA deltas (peft's merge of an embedding adapter), or 0."""
        d = self._buffers.get("lora_fused")
        return 0.0 if d is None else F.embedding(x, d)

    def frozen_forward(self, input: torch.Tensor) -> torch.Tensor:
        return _plus(lookup(self.weight, input), self.fused_branch(input))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Embedding's argument name
        if self.packed:
            if CONTEXT.calibrating:
                raise RuntimeError("a packed (frozen) layer cannot be calibrated")
            return self.frozen_forward(input)
        if CONTEXT.calibrating:  # the calibration trajectory is the full-precision one
            return F.embedding(input, self.weight, self.padding_idx)
        return _lookup(self.weight_fq, input)

    def to_float(self) -> nn.Embedding:
        m = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        for attr in _ATTRS[3:]:
            setattr(m, attr, getattr(self, attr))
        m.weight = _float_weight(self)
        return m
