"""SD3 / MM-DiT joint attention with quantized matmuls.

diffusers' ``JointAttnProcessor2_0`` concatenates the image tokens' and the text tokens' q, k, v along the sequence
and runs one attention over both. :class:`QuantJointAttnProcessor` is the same computation with explicit matmuls whose
operands go through ``attn.matmul_quantizers`` (the same :class:`~dmq.modules.AttentionQuantizers` as the other
attention modules): ``softmax(Q(q) Q(k)^T / sqrt(d))`` -> ``Q(P) Q(v)``, on the joint sequence, so one scale covers
both streams as in the fused kernel it replaces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmq.modules import AttentionQuantizers, _maybe


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


class QuantJointAttnProcessor:
    """``JointAttnProcessor2_0`` with fake-quantized Q·Kᵀ and P·V operands."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 *args, **kwargs):
        quants: AttentionQuantizers = attn.matmul_quantizers
        residual = hidden_states
        batch = hidden_states.shape[0]
        key = attn.to_k(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = _heads(attn.to_q(hidden_states), batch, attn.heads, head_dim)
        key = _heads(key, batch, attn.heads, head_dim)
        value = _heads(attn.to_v(hidden_states), batch, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            ck = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            cv = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2), torch.cat([value, cv], 2)

        query, key, value = _maybe(quants.q, query), _maybe(quants.k, key), _maybe(quants.v, value)
        scores = query @ key.transpose(-1, -2) * (1.0 / math.sqrt(head_dim))  # SDPA's default scale
        probs = _maybe(quants.probs, scores.softmax(dim=-1))
        hidden_states = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            n = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
