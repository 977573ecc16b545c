"""Attention-matmul quantization through diffusers' attention_dispatch: the explicit attention equals SDPA
without quantizers (masks, causal, grouped-query heads), a quantized Flux transformer keeps its own processors and
stays close to full precision, a model without attention quantizers still runs the original dispatch bit for bit,
and restore removes every hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dmq
from dmq import attention
from tests.dmq.helpers import sqnr


class _NoQuant:
    q = k = v = probs = None


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          **kw).transpose(1, 2)


def test_explicit_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, 8, generator=g) for _ in range(3))  # (B, S, H, D) as dispatch passes them
    keep = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    keep[..., 0] = True
    keep[0, 0, 3] = False  # a fully masked row: zeros, as SDPA gives
    bias = torch.randn(2, 4, 7, 7, generator=g)
    for kw in ({}, {"attn_mask": keep}, {"attn_mask": bias}, {"is_causal": True}, {"scale": 0.3}):
        torch.testing.assert_close(attention.quantized_attention(_NoQuant(), q, k, v, **kw), _sdpa(q, k, v, **kw),
                                   rtol=1e-5, atol=1e-6)
    kv = torch.randn(2, 7, 2, 8, generator=g)  # grouped-query: 2 key/value heads for 4 query heads
    ref = _sdpa(q, kv.repeat_interleave(2, 2), kv.repeat_interleave(2, 2))
    torch.testing.assert_close(attention.quantized_attention(_NoQuant(), q, kv, kv, enable_gqa=True), ref,
                               rtol=1e-5, atol=1e-6)


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x = {"hidden_states": torch.randn(1, 16, 8, generator=g), "encoder_hidden_states": torch.randn(1, 5, 16,
                                                                                                    generator=g),
         "pooled_projections": torch.randn(1, 16, generator=g), "img_ids": torch.rand(16, 3, generator=g) * 4,
         "txt_ids": torch.zeros(5, 3)}
    return model, x


def test_dispatch_processors_are_quantized_and_restored(one_thread):
    model, x = _flux()
    procs = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(attention.kind(m.processor) == "dispatch" for m in model.modules() if hasattr(m, "processor"))
    with torch.no_grad():
        ref = {t: model(**x, timestep=torch.tensor([t])).sample for t in (0.2, 0.9)}
    cfg = dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", timestep_bins=2), keep_fp=())
    q = dmq.quantize(model, cfg)
    assert len(q._dmq.attention) == len(procs) == 2
    assert {n: type(m.processor) for n, m in q.named_modules() if hasattr(m, "processor")} == procs  # untouched
    dmq.freeze(dmq.calibrate(q, lambda m: [m(**x, timestep=torch.tensor([t])) for t in (0.2, 0.9)]))
    assert q._dmq.clock.range == (0.0, 1.0)
    calls = []
    attn = q.get_submodule(q._dmq.attention[0]).matmul_quantizers
    attn.probs.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        out = {t: q(**x, timestep=torch.tensor([t])).sample for t in (0.2, 0.9)}
    assert len(calls) == 2  # the quantized matmuls ran, once per call
    for t in out:
        assert 30 < sqnr(ref[t], out[t]) < 200  # quantized, and close
    dmq.restore(q)
    with torch.no_grad():
        for t in ref:  # no hook left: the original dispatch again, bit for bit
            assert torch.equal(model(**x, timestep=torch.tensor([t])).sample, ref[t])


def test_unquantized_attention_keeps_the_original_dispatch(one_thread):
    model, x = _flux()
    with torch.no_grad():
        ref = model(**x, timestep=torch.tensor([0.5])).sample
    other, _ = _flux()
    dmq.quantize(other, dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", dynamic=True), keep_fp=()))
    # the processor module's dispatch function is now wrapped; a model without quantizers takes the original path
    with torch.no_grad():
        assert torch.equal(model(**x, timestep=torch.tensor([0.5])).sample, ref)


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=2,
                                        sample_height=2, sample_frames=5, patch_size=2, max_text_seq_length=4).eval()
    g = torch.Generator().manual_seed(1)
    x = {"hidden_states": torch.randn(1, 2, 4, 4, 4, generator=g),
         "encoder_hidden_states": torch.randn(1, 4, 16, generator=g)}
    return model, x


def test_processors_calling_sdpa_themselves_are_quantized(one_thread):
    """CogVideoX's processor calls F.scaled_dot_product_attention itself: quantized through its module's F, the
    processor untouched; other models with that processor module keep the fused SDPA bit for bit; restore is exact."""
    model, x = _cogvideox()
    proc = next(m.processor for m in model.modules() if hasattr(m, "processor"))
    assert attention.kind(proc) == "sdpa"
    with torch.no_grad():
        ref = {t: model(**x, timestep=torch.tensor([t])).sample for t in (100, 900)}
    plain, _ = _cogvideox()
    cfg = dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", timestep_bins=2), keep_fp=())
    q = dmq.quantize(model, cfg)
    assert len(q._dmq.attention) == 1 and type(q.get_submodule(q._dmq.attention[0]).processor) is type(proc)
    dmq.freeze(dmq.calibrate(q, lambda m: [m(**x, timestep=torch.tensor([t])) for t in (100, 900)]))
    calls = []
    probs = q.get_submodule(q._dmq.attention[0]).matmul_quantizers.probs
    probs.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        out = {t: q(**x, timestep=torch.tensor([t])).sample for t in (100, 900)}
        assert torch.equal(plain(**x, timestep=torch.tensor([100])).sample, ref[100])  # the original SDPA
    assert len(calls) == 2
    for t in out:
        assert 30 < sqnr(ref[t], out[t]) < 200
    dmq.restore(q)
    with torch.no_grad():
        for t in ref:
            assert torch.equal(model(**x, timestep=torch.tensor([t])).sample, ref[t])
