"""Tiny replicas: the video group (see the package docstring), with the single-stream image flow models that share
its timestep quirks: Lumina 2 (reversed, normalised time ``1 - t / 1000``, CFG as two backbone calls) and HiDream
(a mixture-of-experts transformer fed T5 and several Llama layers' hidden states)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from tests.pipelines.tiny_pipelines import Replica, _randn, tiny_vae, tiny_wan_transformer, tiny_wan_vae, wan_calls


def _shifted(sigmas: list[float], shift: float | None = None, mu: float | None = None,
             terminal: float | None = None) -> list[float]:
    """Flow sigmas after FlowMatchEulerDiscreteScheduler's shift, in closed form: static ``s σ / (1 + (s - 1) σ)``
    or dynamic ``e^μ / (e^μ + 1/σ - 1)``, then stretched so the last one is ``terminal`` (LTX)."""
    if mu is not None:
        out = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in sigmas]
    else:
        out = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    if terminal is not None:
        scale = (1 - out[-1]) / (1 - terminal)
        out = [1 - (1 - s) / scale for s in out]
    return out


def _linear_shift(seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """μ for a token count: linear from ``base_shift`` at ``base_len`` to ``max_shift`` at ``max_len`` (Flux, LTX)."""
    return base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)


def _mask(seq: int, pad: int) -> torch.Tensor:
    """An attention mask over ``seq`` text tokens whose last ``pad`` are padding (the masked-row path)."""
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, seq - pad:] = 0
    return mask


def _lumina2() -> Replica:
    """Lumina 2: a next-DiT fed ``1 - t / 1000`` (time runs 0 -> 1 while sampling), Gemma hidden states with a
    mask, CFG as separate conditional and unconditional calls, output negated by the pipeline."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                     num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                     axes_dim_rope=(4, 2, 2), axes_lens=(32, 16, 16),
                                     cap_feat_dim=24).eval()
    pipe = d.Lumina2Pipeline(transformer=tr, vae=tiny_vae(shift_factor=0.1),
                             scheduler=d.FlowMatchEulerDiscreteScheduler(shift=6.0), text_encoder=None, tokenizer=None)
    # 64 x 64 pixels: the pipeline assumes an 8x VAE, so the latents are 8 x 8 (16 tokens at patch 2)
    calls = [{"prompt_embeds": _randn(1, 6, 24, seed=100 + i), "prompt_attention_mask": _mask(6, i + 1),
              "negative_prompt_embeds": _randn(1, 6, 24, seed=200 + i), "negative_prompt_attention_mask": _mask(6, 3),
              "height": 64, "width": 64} for i in range(2)]
    # sigmas linspace(1, 1/n, n) shifted by 6, fed as 1 - σ
    expect = {"transformer": lambda n: [1 - s for s in _shifted([1 - i / n for i in range(n)], shift=6.0)]}
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=4.0,
                   extra={"calibration_timesteps": expect})


def _hidream() -> Replica:
    """HiDream-I1: a double/single-stream transformer with mixture-of-experts feed-forwards (top-1 of 2 routed
    experts here), conditioned on T5 hidden states, the hidden states of several Llama layers
    (``[layers, batch, seq, dim]``) and pooled CLIP embeddings; dynamic shifting, output negated by the pipeline."""
    import diffusers as d

    torch.manual_seed(0)
    # the pipeline always samples default_sample_size**2 = 128 x 128 latents: patch 8 keeps that at 256 tokens
    tr = d.HiDreamImageTransformer2DModel(patch_size=8, in_channels=4, out_channels=4, num_layers=1,
                                          num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                          caption_channels=[32, 16], text_emb_dim=24, num_routed_experts=2,
                                          num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(128, 128),
                                          llama_layers=(0, 2)).eval()
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    vae = tiny_vae(shift_factor=0.1, mid_attention=False)
    pipe = d.HiDreamImagePipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                  text_encoder_4=None, tokenizer_4=None, transformer=tr)
    calls = []
    for i in range(2):
        kw = {}
        for sign, seed in (("", 100 + i), ("negative_", 200 + i)):
            kw[f"{sign}prompt_embeds_t5"] = _randn(1, 5, 32, seed=seed)
            kw[f"{sign}prompt_embeds_llama3"] = _randn(3, 1, 4, 16, seed=seed + 1000)  # 3 Llama layers
            kw[f"{sign}pooled_prompt_embeds"] = _randn(1, 24, seed=seed + 2000)
        calls.append(kw)
    # the scheduler's default grid t = linspace(1000, 1, n) with μ for the transformer's 256 tokens (0.5 exactly)
    mu = _linear_shift(tr.max_seq, 256, 4096, 0.5, 1.15)
    expect = {"transformer": lambda n: [1000 * s for s in _shifted(
        [(1000 - i * 999 / (n - 1)) / 1000 for i in range(n)], mu=mu)]}
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=5.0,
                   extra={"calibration_timesteps": expect})


def _wan21() -> Replica:
    """Wan 2.1 text-to-video: one transformer over the whole schedule, flow shift, 5 frames through a Wan VAE."""
    import diffusers as d

    pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=tiny_wan_transformer(0),
                         scheduler=d.FlowMatchEulerDiscreteScheduler(shift=5.0))
    calls = wan_calls()
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=5.0)


def _hunyuanvideo() -> Replica:
    """HunyuanVideo: a dual/single-stream 3-D transformer with a token refiner over masked Llama hidden states, pooled
    CLIP embeddings, guidance distilled into an embedding (no CFG batch), explicit ``sigmas`` with a large flow
    shift; 9 frames through a tiny causal HunyuanVideo VAE (8x spatial, 4x temporal)."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()
    torch.manual_seed(1)
    blocks = ("HunyuanVideoDownBlock3D",) * 4
    vae = d.AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, down_block_types=blocks,
                                      up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(4, 4, 4, 4),
                                      layers_per_block=1, norm_num_groups=2, spatial_compression_ratio=8,
                                      temporal_compression_ratio=4, mid_block_add_attention=False).eval()
    pipe = d.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                  scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                  tokenizer_2=None)
    calls = [{"prompt_embeds": _randn(1, 6, 16, seed=100 + i), "prompt_attention_mask": _mask(6, 2 * i + 1),
              "pooled_prompt_embeds": _randn(1, 8, seed=300 + i), "height": 16, "width": 16, "num_frames": 9}
             for i in range(2)]
    # the pipeline's own sigmas linspace(1, 0, n + 1)[:-1], shifted by 7
    expect = {"transformer": lambda n: [1000 * s for s in _shifted([1 - i / n for i in range(n)], shift=7.0)]}
    return Replica(pipe, calls, {**calls[0], "output_type": "pt"}, guidance_scale=6.0,
                   extra={"calibration_timesteps": expect})


def _ltx() -> Replica:
    """LTX-Video: a 3-D transformer over patchified video tokens with T5 embeddings and masks, LTX's scheduler
    (dynamic shifting, ``shift_terminal``), frame-rate-scaled rope; 9 frames through a tiny LTX VAE."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=2, caption_channels=24).eval()
    torch.manual_seed(1)
    vae = d.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1),
                                  spatio_temporal_scaling=(True, True, False, False),
                                  decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                  upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
                                  patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    sched = d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                              base_image_seq_len=16, max_image_seq_len=256, shift_terminal=0.1)
    pipe = d.LTXPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=tr)
    calls = [{"prompt_embeds": _randn(1, 6, 24, seed=100 + i), "prompt_attention_mask": _mask(6, i + 1),
              "negative_prompt_embeds": _randn(1, 6, 24, seed=200 + i), "negative_prompt_attention_mask": _mask(6, 2),
              "height": 32, "width": 32, "num_frames": 9} for i in range(2)]
    # the pipeline's sigmas linspace(1, 1/n, n), μ for its latent token count, stretched to end at 0.1
    frames = (9 - 1) // pipe.vae_temporal_compression_ratio + 1
    mu = _linear_shift(frames * (32 // pipe.vae_spatial_compression_ratio) ** 2, 16, 256, 0.95, 2.05)
    expect = {"transformer": lambda n: [1000 * s for s in _shifted([1 - i / n for i in range(n)], mu=mu,
                                                                    terminal=0.1)]}
    return Replica(pipe, calls, {**calls[0], "output_type": "pt"}, guidance_scale=3.0,
                   extra={"calibration_timesteps": expect})


BUILDERS: dict[str, Callable[[], Replica]] = {"lumina2": _lumina2, "hidream": _hidream, "wan2.1": _wan21,
                                              "hunyuanvideo": _hunyuanvideo, "ltx": _ltx}
