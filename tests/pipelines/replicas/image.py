"""Tiny replicas: the image group (see the package docstring).

Flux 2, SD3.5, Qwen-Image, Z-Image, Sana and Chroma, each with its own conventions: the timestep the backbone is
fed (``t / 1000``, ``1 - t / 1000``, raw), how classifier-free guidance is batched (one doubled batch, two separate
calls, none: an embedded guidance scale), and the scheduler its checkpoints ship with (dynamic shifting, flow sigmas
on a DPM-Solver). Schedulers are built with the settings of the public checkpoints' ``scheduler_config.json``.
"""

from __future__ import annotations

from typing import Callable

import torch

from tests.pipelines.tiny_pipelines import Replica, _randn, tiny_vae

# the dynamic-shift settings of the Flux / Chroma / Qwen-Image checkpoints, with sequence lengths scaled to the tiny
# latents so that mu differs between the two calibration calls (which have different sizes)
_DYNAMIC = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 16,
            "max_image_seq_len": 256}


# the timestep range the denoiser's bins must end up on: the backbone is fed t / 1000 (or 1 - t / 1000) or raw t
_UNIT, _RAW = {"timestep_range": [0.0, 1.0]}, {"timestep_range": [0.0, 1000.0]}


def _flux2() -> Replica:
    """Flux 2 [dev]: a Mistral-embedded flow transformer fed ``t / 1000``, an embedded guidance scale (no CFG batch),
    empirical ``mu`` with explicit sigmas, and its own VAE (2x2 latent patchify with batch-norm statistics)."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2)).eval()
    torch.manual_seed(1)
    vae = d.AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                               up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                               latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = d.Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=tr)
    # the second call is smaller and not square: another image_seq_len, hence another empirical mu
    calls = [{"prompt_embeds": _randn(1, 6, 32, seed=100 + i), "height": 16 >> i, "width": 16} for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=4.0, extra=dict(_UNIT))


def _sd35() -> Replica:
    """SD3.5: the MMDiT with RMS-normed q/k and MMDiT-X dual attention (a second self-attention on the image stream)
    in its first blocks; shifted flow schedule."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                 dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    pipe = d.StableDiffusion3Pipeline(transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                      vae=tiny_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    calls = []
    for i in range(2):
        calls.append({"prompt_embeds": _randn(1, 6, 32, seed=100 + i),
                      "negative_prompt_embeds": _randn(1, 6, 32, seed=200 + i),
                      "pooled_prompt_embeds": _randn(1, 16, seed=300 + i),
                      "negative_pooled_prompt_embeds": _randn(1, 16, seed=400 + i), "height": 16, "width": 16})
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0, extra=dict(_RAW))


def _qwen_image() -> Replica:
    """Qwen-Image: an MMDiT fed ``t / 1000`` with masked text tokens, true CFG as two separate transformer calls
    (``true_cfg_scale``), dynamic shifting (exponential time shift) and the causal-3D Qwen-Image VAE."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(1)
    vae = d.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                   temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    sched = d.FlowMatchEulerDiscreteScheduler(shift=1.0, time_shift_type="exponential", **_DYNAMIC)
    pipe = d.QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=tr)
    calls = []
    for i in range(2):
        mask = torch.ones(1, 6, dtype=torch.long)
        mask[:, 4 + i:] = 0  # padded prompt tokens, as the text encoder's attention mask marks them
        calls.append({"prompt_embeds": _randn(1, 6, 16, seed=100 + i), "prompt_embeds_mask": mask,
                      "negative_prompt_embeds": _randn(1, 6, 16, seed=200 + i),
                      "negative_prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long), "true_cfg_scale": 4.0,
                      "height": 32, "width": 32 + 16 * i})  # two sizes: two values of mu
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=None, extra=dict(_UNIT))


def _z_image() -> Replica:
    """Z-Image: a single-stream DiT on lists of per-sample tensors (ragged captions), fed ``1 - t / 1000``, CFG as
    one doubled list, dynamic ``mu`` with Z-Image's own sigmas."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24,
                                    axes_dims=[8, 4, 4], axes_lens=[64, 16, 16]).eval()
    with torch.no_grad():  # allocated with torch.empty: give the pad tokens defined values
        tr.x_pad_token.copy_(_randn(*tr.x_pad_token.shape, seed=7))
        tr.cap_pad_token.copy_(_randn(*tr.cap_pad_token.shape, seed=8))
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = d.ZImagePipeline(scheduler=sched, vae=tiny_vae(shift_factor=0.1), text_encoder=None, tokenizer=None,
                            transformer=tr)
    # ragged captions (Z-Image drops the padding): 5 and 7 tokens
    calls = [{"prompt_embeds": [_randn(5 + 2 * i, 24, seed=100 + i)],
              "negative_prompt_embeds": [_randn(4, 24, seed=200 + i)], "height": 16, "width": 16}
             for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0, extra=dict(_UNIT))


def _sana() -> Replica:
    """Sana: a linear-attention DiT with cross-attention to masked Gemma embeddings, the raw timestep, CFG as one
    doubled batch, the checkpoints' DPM-Solver++ with flow sigmas, and the deep-compression autoencoder (DC-AE)."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1).eval()
    torch.manual_seed(1)
    vae = d.AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                          encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                          encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                          encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                          encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                          downsample_block_type="conv", upsample_block_type="interpolate",
                          decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
    sched = d.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0)
    pipe = d.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sched)
    calls = []
    for i in range(2):
        mask = torch.ones(1, 6, dtype=torch.long)
        mask[:, 5:] = 0
        calls.append({"prompt_embeds": _randn(1, 6, 16, seed=100 + i), "prompt_attention_mask": mask,
                      "negative_prompt_embeds": _randn(1, 6, 16, seed=200 + i),
                      "negative_prompt_attention_mask": torch.ones(1, 6, dtype=torch.long), "height": 32, "width": 32,
                      "use_resolution_binning": False, "complex_human_instruction": None,
                      "negative_prompt": None})
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=4.5, extra=dict(_RAW))


def _chroma() -> Replica:
    """Chroma: the Flux architecture with modulations from a distilled approximator network instead of per-block
    AdaLN projections, T5 embeddings with attention masks, real CFG as two separate calls, dynamic shifting."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=1).eval()
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, **_DYNAMIC)
    pipe = d.ChromaPipeline(scheduler=sched, vae=tiny_vae(shift_factor=0.1), text_encoder=None, tokenizer=None,
                            transformer=tr)
    calls = []
    for i in range(2):
        mask = torch.ones(1, 6)  # float, as Chroma's own prompt encoding returns it
        mask[:, 4:] = 0
        calls.append({"prompt_embeds": _randn(1, 6, 32, seed=100 + i), "prompt_attention_mask": mask,
                      "negative_prompt_embeds": _randn(1, 6, 32, seed=200 + i),
                      "negative_prompt_attention_mask": torch.ones(1, 6), "height": 8 << i, "width": 8 << i})
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0, extra=dict(_UNIT))


BUILDERS: dict[str, Callable[[], Replica]] = {
    "flux2": _flux2, "sd3.5": _sd35, "qwen-image": _qwen_image, "z-image": _z_image, "sana": _sana,
    "chroma": _chroma,
}
