"""Attention-matmul quantization through diffusers' attention_dispatch: the explicit attention equals SDPA
without quantizers (masks, causal, grouped-query heads), a quantized Flux transformer keeps its own processors and
stays close to full precision, a model without attention quantizers still runs the original dispatch bit for bit,
and restore removes every hook. The same for processors that call ``F.scaled_dot_product_attention`` themselves
(Lumina 2: grouped-query heads, a boolean text mask)."""

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


def test_sana_cross_attention_explicit_matmuls_equal_its_processor():
    """SanaAttnProcessor2_0 normalises q / k over the whole projection before the head split: the explicit-matmul
    processor reproduces it, with a padding mask (the L2 norm differs per head and across heads)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    from diffusers.models.transformers.transformer_sana_video import SanaAttnProcessor2_0 as VideoProcessor

    from dmq.modules import QuantAttnProcessor

    # Sana-Video's processor of the same name goes through dispatch_attention_fn: it keeps its own code
    assert attention.kind(SanaAttnProcessor2_0()) == "classic" and attention.kind(VideoProcessor()) == "dispatch"
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.zeros(2, 1, 5)
    mask[1, :, 3:] = -10000.0  # Sana's encoder-mask bias
    for qk_norm in ("rms_norm_across_heads", "l2", None):
        torch.manual_seed(1)
        attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, kv_heads=2, dim_head=8, qk_norm=qk_norm,
                         bias=True, processor=SanaAttnProcessor2_0()).eval()
        with torch.no_grad():
            for w in (attn.norm_q, attn.norm_k):
                if getattr(w, "weight", None) is not None:
                    w.weight.copy_(torch.rand(w.weight.shape, generator=g) + 0.5)
            ref = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
            attn.matmul_quantizers = _NoQuant()
            attn.set_processor(QuantAttnProcessor(norm_before_heads=True))
            torch.testing.assert_close(attn(x, encoder_hidden_states=ctx, attention_mask=mask), ref, rtol=1e-5,
                                       atol=1e-6)


def test_sana_linear_attention_explicit_operands_equal_its_processor(one_thread):
    """QuantLinearAttnProcessor without quantizers is Sana's ReLU linear attention; quantized (int8 operands), it
    stays close, and the attention module is quantized, saved and restored like the softmax ones."""
    from diffusers import SanaTransformer2DModel
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from dmq.modules import QuantLinearAttnProcessor

    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8).eval()
    attn = model.transformer_blocks[0].attn1
    assert isinstance(attn.processor, SanaLinearAttnProcessor2_0)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        ref = attn(x)
        attn.matmul_quantizers = _NoQuant()
        original, _ = attn.processor, attn.set_processor(QuantLinearAttnProcessor())
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)
        attn.set_processor(original)
        del attn.matmul_quantizers
    g = torch.Generator().manual_seed(2)
    kw = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(1, 6, 16,
                                                                                                       generator=g)}
    with torch.no_grad():
        full = model(**kw, timestep=torch.tensor([500])).sample
    q = dmq.quantize(model, dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8"), keep_fp=()))
    assert "transformer_blocks.0.attn1" in q._dmq.attention and attention.kind(original) == "linear"
    assert attn.matmul_quantizers.probs is None  # no softmax
    dmq.freeze(dmq.calibrate(q, lambda m: m(**kw, timestep=torch.tensor([500]))))
    with torch.no_grad():
        out = q(**kw, timestep=torch.tensor([500])).sample
    assert 25 < sqnr(full, out) < 200  # quantized, and close
    dmq.restore(q)
    assert type(attn.processor) is SanaLinearAttnProcessor2_0


def test_sdpa_layout_equals_sdpa():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 7, 8, generator=g)  # (B, H, S, D) as processors pass SDPA
    kv = torch.randn(2, 2, 5, 8, generator=g)
    keep = torch.rand(2, 1, 1, 5, generator=g) > 0.4
    keep[..., 0] = True
    for kw in ({}, {"attn_mask": keep}, {"is_causal": True}, {"scale": 0.3}):
        ref = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True, **kw)
        torch.testing.assert_close(attention.quantized_sdpa(_NoQuant(), q, kv, kv, enable_gqa=True, **kw), ref,
                                   rtol=1e-5, atol=1e-6)
    x3 = torch.randn(3, 6, 8, generator=g)  # no head axis
    torch.testing.assert_close(attention.quantized_sdpa(_NoQuant(), x3, x3, x3),
                               F.scaled_dot_product_attention(x3, x3, x3), rtol=1e-5, atol=1e-6)


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                      axes_dim_rope=(4, 2, 2), axes_lens=(32, 16, 16), cap_feat_dim=8).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, 4:] = False
    x = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
         "encoder_hidden_states": torch.randn(1, 6, 8, generator=g), "encoder_attention_mask": mask}
    return model, x


def test_sdpa_processors_are_quantized_and_restored(one_thread):
    model, x = _lumina2()
    procs = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    assert {attention.kind(m.processor) for m in model.modules() if hasattr(m, "processor")} == {"sdpa"}
    with torch.no_grad():
        ref = {t: model(**x, timestep=torch.tensor([t])).sample for t in (0.2, 0.9)}
    other, _ = _lumina2()
    cfg = dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", timestep_bins=2), keep_fp=())
    q = dmq.quantize(model, cfg)
    assert len(q._dmq.attention) == len(procs) == 3  # noise and context refiners, one layer
    assert {n: type(m.processor) for n, m in q.named_modules() if hasattr(m, "processor")} == procs  # untouched
    dmq.freeze(dmq.calibrate(q, lambda m: [m(**x, timestep=torch.tensor([t])) for t in (0.2, 0.9)]))
    calls = []
    for name in q._dmq.attention:
        q.get_submodule(name).matmul_quantizers.probs.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        out = {t: q(**x, timestep=torch.tensor([t])).sample for t in (0.2, 0.9)}
        # a model without quantizers in the same (rebound) module: torch's SDPA, bit for bit
        assert torch.equal(other(**x, timestep=torch.tensor([0.2])).sample, ref[0.2])
    assert len(calls) == 2 * len(procs)  # every attention ran its quantized matmuls, once per call
    for t in out:
        assert 30 < sqnr(ref[t], out[t]) < 200  # quantized, and close
    dmq.restore(q)
    with torch.no_grad():
        for t in ref:
            assert torch.equal(model(**x, timestep=torch.tensor([t])).sample, ref[t])


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
