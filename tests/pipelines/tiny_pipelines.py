"""Tiny offline replicas of the pipeline families ``quantize_pipeline`` supports.

Every component is built from a config with random weights (seeded); there is no tokenizer and no hub. Text-to-image
pipelines are driven by ``prompt_embeds`` (plus what each family needs: pooled embeddings, attention masks).
``build(name)`` returns a :class:`Replica`: the pipeline, calibration ``call_kwargs`` (two calls), the keyword
arguments of one generation call, and the timesteps a calibration sampling run must show the backbone.
These test integration, not image quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("ddpm", "ddim", "sd", "sdxl", "dit", "pixart-alpha", "pixart-sigma", "sd3", "digits-unet", "digits-dit")
# the newer families: flow models with attention_dispatch processors, several denoisers, video latents
NEW_FAMILIES = ("flux", "wan2.2")
TEXT_FAMILIES = ("sd", "sdxl", "pixart-alpha", "pixart-sigma", "sd3")


@dataclass
class Replica:
    pipe: Any
    calls: list[dict]  # calibration call_kwargs
    generate: dict  # one generation call (no generator)
    guidance_scale: float | None = None
    extra: dict = field(default_factory=dict)


def _seed(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(i)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_seed(seed))


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None, mid_attention: bool = True):
    """A one-block AutoencoderKL (no downsampling); ``mid_attention=False`` drops the mid-block attention, whose cost
    grows with the square of the latent area (HiDream always samples 128 x 128 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                         shift_factor=shift_factor, mid_block_add_attention=mid_attention).eval()


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=64, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def _cond_unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
             "projection_class_embeddings_input_dim": 16 + 6 * 4} if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, **extra).eval()


def _text_calls(n: int, seq: int, dim: int, pooled: int | None = None, mask: bool = False) -> list[dict]:
    calls = []
    for i in range(n):
        kw = {"prompt_embeds": _randn(1, seq, dim, seed=100 + i), "negative_prompt_embeds": _randn(1, seq, dim,
                                                                                                    seed=200 + i)}
        if pooled is not None:
            kw["pooled_prompt_embeds"] = _randn(1, pooled, seed=300 + i)
            kw["negative_pooled_prompt_embeds"] = _randn(1, pooled, seed=400 + i)
        if mask:
            kw["prompt_attention_mask"] = torch.ones(1, seq, dtype=torch.long)
            kw["negative_prompt_attention_mask"] = torch.ones(1, seq, dtype=torch.long)
        calls.append(kw)
    return calls


def tiny_digits_pipeline(sample_size: int = 8):
    """A class-conditional DigitsPipeline with a tiny random (seeded) U-Net: 10 digits and the null label."""
    import diffusers as d

    from pipelines.digits_pipeline import DigitsPipeline

    torch.manual_seed(0)
    unet = d.UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                         num_class_embeds=11)
    return DigitsPipeline(scheduler=d.DDPMScheduler(num_train_timesteps=1000), unet=unet)


def build(name: str) -> Replica:
    """A fresh tiny replica of family ``name`` (one of :data:`FAMILIES`)."""
    import diffusers as d

    if name in ("ddpm", "ddim"):
        torch.manual_seed(0)
        unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                             attention_head_dim=4).eval()
        if name == "ddpm":
            pipe = d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler(num_train_timesteps=1000))
        else:
            pipe = d.DDIMPipeline(unet=unet, scheduler=d.DDIMScheduler(num_train_timesteps=1000))
        rep = Replica(pipe, [{"batch_size": 1}, {"batch_size": 1}], {"batch_size": 2, "output_type": "np"})
    elif name == "sd":
        pndm = d.PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        pipe = d.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text(), tokenizer=None,
                                         unet=_cond_unet(False), scheduler=pndm,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        calls = _text_calls(2, 6, 16)
        rep = Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)
    elif name == "sdxl":
        pipe = d.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                           tokenizer_2=None, unet=_cond_unet(True),
                                           scheduler=d.EulerDiscreteScheduler(), add_watermarker=False)
        calls = _text_calls(2, 6, 16, pooled=16)
        rep = Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)
    elif name == "dit":
        torch.manual_seed(0)
        dit = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
        pipe = d.DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=d.DDIMScheduler(),
                             id2label={0: "zero", 1: "one", 2: "two"})
        rep = Replica(pipe, [{"class_labels": [0]}, {"class_labels": [2]}],
                      {"class_labels": [1, 2], "output_type": "np"}, guidance_scale=3.0)
    elif name in ("pixart-alpha", "pixart-sigma"):
        torch.manual_seed(0)
        tr = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                        caption_channels=32, norm_type="ada_norm_single",
                                        use_additional_conditions=False).eval()
        cls = d.PixArtAlphaPipeline if name == "pixart-alpha" else d.PixArtSigmaPipeline
        pipe = cls(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr,
                   scheduler=d.DPMSolverMultistepScheduler())
        calls = [{**kw, "use_resolution_binning": False, "negative_prompt": None}
                 for kw in _text_calls(2, 6, 32, mask=True)]
        rep = Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)
    elif name == "sd3":
        torch.manual_seed(0)
        tr = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()
        pipe = d.StableDiffusion3Pipeline(transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=tiny_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                          tokenizer_3=None)
        calls = _text_calls(2, 6, 32, pooled=16)
        rep = Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)
    elif name in ("digits-unet", "digits-dit"):
        from pipelines import DigitsPipeline

        pipe = DigitsPipeline.from_pretrained(str(ROOT / "assets" / name))
        rep = Replica(pipe, [{"class_labels": [3]}, {"class_labels": [7]}],
                      {"class_labels": [1, 8], "output_type": "np"}, guidance_scale=2.0)
    elif name == "flux":
        rep = _flux()
    elif name == "wan2.2":
        rep = _wan22()
    elif name in _MORE:
        rep = _MORE[name]()
    else:
        raise ValueError(f"unknown family {name!r}; valid: {FAMILIES + NEW_FAMILIES}")
    rep.pipe.set_progress_bar_config(disable=True)
    return rep


def _flux() -> Replica:
    """Flux.1: a flow transformer fed ``t / 1000``, dynamic shifting (``mu``), guidance embedding off."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    sched = d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=16, max_image_seq_len=64)
    pipe = d.FluxPipeline(scheduler=sched, vae=tiny_vae(shift_factor=0.1), text_encoder=None, tokenizer=None,
                          text_encoder_2=None, tokenizer_2=None, transformer=tr)
    calls = [{"prompt_embeds": _randn(1, 6, 32, seed=100 + i), "pooled_prompt_embeds": _randn(1, 16, seed=300 + i),
              "height": 8, "width": 8} for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=None)


def tiny_wan_transformer(seed: int):
    """A tiny Wan 2.x transformer (text width 32, 4 latent channels)."""
    import diffusers as d

    torch.manual_seed(seed)
    return d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                   out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_wan_vae():
    """A tiny Wan VAE: 4 latent channels, 8x spatial and 4x temporal compression."""
    import diffusers as d

    torch.manual_seed(1)
    return d.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                              latents_std=[1.0] * 4).eval()


def wan_calls() -> list[dict]:
    """Two calibration calls of a tiny Wan pipeline: 5 frames of 16 x 16, CFG with negative embeddings."""
    return [{"prompt_embeds": _randn(1, 6, 32, seed=100 + i), "negative_prompt_embeds": _randn(1, 6, 32, seed=200 + i),
             "height": 16, "width": 16, "num_frames": 5} for i in range(2)]


def _wan22() -> Replica:
    """Wan 2.2 text-to-video: two experts (``transformer`` above the boundary timestep, ``transformer_2`` below),
    a flow schedule with shift, 5-frame video latents through a tiny Wan VAE."""
    import diffusers as d

    pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=tiny_wan_transformer(0),
                         transformer_2=tiny_wan_transformer(5),
                         scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio=0.6)
    calls = wan_calls()
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)


def generate(rep: Replica, steps: int, seed: int = 0) -> torch.Tensor:
    """One generation call at ``steps`` steps, as a float tensor."""
    kw = dict(rep.generate)
    if rep.guidance_scale is not None:
        kw["guidance_scale"] = rep.guidance_scale
    out = rep.pipe(**kw, num_inference_steps=steps, generator=_seed(seed))
    images = out.images if hasattr(out, "images") else out[0]
    return torch.as_tensor(images).float() if not isinstance(images, torch.Tensor) else images.float()


# the newer families' replicas live in tests/pipelines/replicas (they import the helpers above)
from tests.pipelines.replicas import BUILDERS as _MORE  # noqa: E402

NEW_FAMILIES = ("flux", "wan2.2", *_MORE)
