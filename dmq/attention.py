"""Quantized attention matmuls for every diffusers attention processor.

Two kinds of processors exist. The classic ones (``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``) call
``scaled_dot_product_attention`` themselves: dmq swaps them for processors with explicit matmuls
(:class:`dmq.modules.QuantAttnProcessor`, :class:`dmq.joint_attention.QuantJointAttnProcessor`). The newer ones
(Flux, Flux 2, Wan, Qwen-Image, HunyuanVideo, LTX, Sana, Lumina 2, HiDream, Z-Image, ...) compute attention through
``diffusers.models.attention_dispatch.dispatch_attention_fn``. For those the processor stays untouched: a pre-hook
on the attention module makes its :class:`~dmq.modules.AttentionQuantizers` the thread's active set, and the
``dispatch_attention_fn`` name in the processor's module is wrapped, once, by a function that computes
``softmax(Q(q) Q(k)^T * scale + mask) -> Q(P) Q(v)`` while a set is active and calls the original dispatch (fused
SDPA or whatever backend is selected) otherwise. Attention that is not quantized therefore keeps its fused kernel.
Processors that call ``F.scaled_dot_product_attention`` on their own (CogVideoX's, and the other non-classic ones in
``diffusers.models.attention_processor``) are handled the same way: their module's ``F`` becomes a view of
``torch.nn.functional`` whose ``scaled_dot_product_attention`` quantizes while a set is active.
"""

from __future__ import annotations

import logging
import math
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from dmq.joint_attention import QuantJointAttnProcessor
from dmq.modules import QUANTIZABLE_PROCESSORS, AttentionQuantizers, QuantAttnProcessor, _maybe

logger = logging.getLogger(__name__)

_LOCAL = threading.local()  # ``quants``: (the active attention's quantizers, the enclosing entry) per thread
_WRAPPED = "_dmq_dispatch_original"
_FUNCTIONAL = "_dmq_functional"


def dispatches(processor: object) -> bool:
    """Whether the processor computes attention through ``attention_dispatch.dispatch_attention_fn``."""
    call = getattr(type(processor), "__call__", None)
    code = getattr(call, "__code__", None)
    module = sys.modules.get(type(processor).__module__)
    return (code is not None and "dispatch_attention_fn" in code.co_names and module is not None
            and callable(getattr(module, "dispatch_attention_fn", None)))


def calls_sdpa(processor: object) -> bool:
    """Whether the processor calls ``F.scaled_dot_product_attention`` itself, ``F`` being its module's
    ``torch.nn.functional`` (CogVideoX's processor, among others)."""
    call = getattr(type(processor), "__call__", None)
    code = getattr(call, "__code__", None)
    module = sys.modules.get(type(processor).__module__)
    return (code is not None and {"F", "scaled_dot_product_attention"} <= set(code.co_names) and module is not None
            and getattr(getattr(module, "F", None), _FUNCTIONAL, getattr(module, "F", None)) is F)


def kind(processor: object) -> str | None:
    """``"classic"``, ``"joint"``, ``"dispatch"``, ``"sdpa"`` or None (a processor dmq cannot quantize)."""
    name = type(processor).__name__
    if name == "JointAttnProcessor2_0":
        return "joint"
    if name in QUANTIZABLE_PROCESSORS:
        return "classic"
    if dispatches(processor):
        return "dispatch"
    return "sdpa" if calls_sdpa(processor) else None


def attach(mod: nn.Module, quants: AttentionQuantizers) -> str | None:
    """Quantize the matmuls of attention module ``mod`` with ``quants`` (kept as ``mod.matmul_quantizers``);
    returns the processor kind, or None (nothing changed) when the processor is not quantizable."""
    proc = getattr(mod, "processor", None)
    k = kind(proc)
    if k is None:
        return None
    quants.original_processor = proc
    mod.matmul_quantizers = quants
    if k in ("dispatch", "sdpa"):
        module = sys.modules[type(proc).__module__]
        _wrap_dispatch(module) if k == "dispatch" else _wrap_functional(module)
        quants._dmq_handles = [mod.register_forward_pre_hook(_enter), mod.register_forward_hook(_leave,
                                                                                                  always_call=True)]
    else:
        mod.set_processor(QuantJointAttnProcessor() if k == "joint" else QuantAttnProcessor())
    return k


def detach(mod: nn.Module) -> None:
    """Undo :func:`attach`: the original processor, no hooks, no quantizers."""
    quants = mod.matmul_quantizers
    for h in getattr(quants, "_dmq_handles", ()):
        h.remove()
    if mod.processor is not quants.original_processor:
        mod.set_processor(quants.original_processor)
    del mod.matmul_quantizers


def _active() -> AttentionQuantizers | None:
    entry = getattr(_LOCAL, "quants", None)
    return None if entry is None else entry[0]


def _enter(mod: nn.Module, args: tuple) -> None:
    _LOCAL.quants = (mod.matmul_quantizers, getattr(_LOCAL, "quants", None))


def _leave(mod: nn.Module, args: tuple, output: object) -> None:
    entry = getattr(_LOCAL, "quants", None)
    _LOCAL.quants = None if entry is None else entry[1]


def _wrap_dispatch(module) -> None:
    fn = module.dispatch_attention_fn
    if getattr(fn, _WRAPPED, None) is not None:
        return

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, **kwargs):
        quants = _active()
        if (quants is None or kwargs.get("parallel_config") is not None or attention_kwargs
                or not (attn_mask is None or isinstance(attn_mask, torch.Tensor))):
            # not quantized, or a call only the backend understands (context parallel, backend arguments, a flex
            # BlockMask): the original dispatch, fused
            return fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                      **kwargs)
        return quantized_attention(quants, query, key, value, attn_mask, is_causal, scale, enable_gqa)

    setattr(dispatch_attention_fn, _WRAPPED, fn)
    module.dispatch_attention_fn = dispatch_attention_fn
    logger.debug("dmq: wrapped dispatch_attention_fn of %s", module.__name__)


class _Functional:
    """``torch.nn.functional`` for a processor module, except that ``scaled_dot_product_attention`` quantizes its
    matmuls while an attention module's quantizers are active in this thread (and is the fused original otherwise)."""

    _dmq_functional = F

    def __getattr__(self, name: str):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                     scale=None, enable_gqa=False, **kwargs):
        quants = _active()
        if quants is None or kwargs or not (attn_mask is None or isinstance(attn_mask, torch.Tensor)):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                  enable_gqa=enable_gqa, **kwargs)
        # SDPA's (batch, heads, seq, dim) layout <-> dispatch's (batch, seq, heads, dim)
        out = quantized_attention(quants, *(x.transpose(1, 2) for x in (query, key, value)), attn_mask, is_causal,
                                  scale, enable_gqa)
        return out.transpose(1, 2)


def _wrap_functional(module) -> None:
    if getattr(module.F, _FUNCTIONAL, None) is not None:
        return
    module.F = _Functional()
    logger.debug("dmq: wrapped F.scaled_dot_product_attention of %s", module.__name__)


def quantized_attention(quants: AttentionQuantizers, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False) -> torch.Tensor:
    """Attention on dispatch's ``(batch, seq, heads, dim)`` layout with fake-quantized Q·Kᵀ and P·V operands,
    the same result as ``scaled_dot_product_attention`` up to the quantization (mask: boolean keep-mask or additive
    bias, broadcast to ``(batch, heads, q, k)``; grouped-query heads repeated)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
    if enable_gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k, v = _maybe(quants.q, q), _maybe(quants.k, k), _maybe(quants.v, v)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).float() * s
    if is_causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril(lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    # a fully masked row: SDPA returns zeros there (softmax over all -inf would give NaN)
    probs = _maybe(quants.probs, scores.softmax(dim=-1).nan_to_num(nan=0.0).to(v.dtype))
    return (probs @ v).transpose(1, 2)
