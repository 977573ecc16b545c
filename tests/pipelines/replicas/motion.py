"""Tiny replicas: the motion group (see the package docstring).

CogVideoX (a 3-D transformer with zero-terminal-SNR v-prediction DDIM), Stable Video Diffusion (an image-to-video
spatio-temporal U-Net on EDM/Karras sigmas, conditioned by a CLIP image encoder) and AnimateDiff (an SD U-Net with
motion modules, ``UNetMotionModel``).
"""

from __future__ import annotations

from typing import Callable

import torch

from tests.pipelines.tiny_pipelines import Replica, _randn, tiny_vae


def _cogvideox() -> Replica:
    """CogVideoX-2b's layout: sincos 3-D positions over text + patches, the 2b scheduler (v-prediction, zero-terminal
    SNR, ``snr_shift_scale``, trailing spacing), 9 frames -> 3 latent frames through a causal 3-D VAE."""
    import diffusers as d

    torch.manual_seed(0)
    tr = d.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=2,
                                       sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=6).eval()
    torch.manual_seed(1)
    blocks = ("CogVideoXDownBlock3D",) * 3
    vae = d.AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=blocks,
                                   up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                   latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                   temporal_compression_ratio=4).eval()
    sched = d.CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                     set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")
    pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sched)
    calls = [{"prompt_embeds": _randn(1, 6, 32, seed=100 + i), "negative_prompt_embeds": _randn(1, 6, 32,
                                                                                                seed=200 + i),
              "height": 8, "width": 8, "num_frames": 9} for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)


def _svd() -> Replica:
    """Stable Video Diffusion (image to video): the image enters through a CLIP vision encoder (cross-attention) and
    the VAE (concatenated latents); EDM's continuous timesteps ``ln(σ)/4`` on Karras sigmas in [0.002, 700] (SVD's
    published scheduler config), per-frame guidance from min to max. One U-Net level: spatial and temporal attention
    and the image cross-attention sit in the mid block."""
    import diffusers as d
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # the spatio-temporal blocks hard-code 32 norm groups: 32 channels at least, so one level keeps the test fast
    torch.manual_seed(0)
    unet = d.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("DownBlockSpatioTemporal",), up_block_types=("UpBlockSpatioTemporal",),
        cross_attention_dim=16, num_attention_heads=(2,), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=3).eval()
    torch.manual_seed(1)
    vae = d.AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                         block_out_channels=(32,), latent_channels=4, sample_size=8).eval()
    torch.manual_seed(2)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=16,
                                                         num_hidden_layers=2, num_attention_heads=2, image_size=8,
                                                         patch_size=2)).eval()
    sched = d.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
                                     sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
                                     timestep_type="continuous", use_karras_sigmas=True)
    pipe = d.StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=sched,
                                          feature_extractor=CLIPImageProcessor(crop_size=8, size=8))
    calls = [{"image": torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(100 + i)), "height": 8,
              "width": 8, "num_frames": 3, "min_guidance_scale": 1.0, "max_guidance_scale": 2.5} for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=None)


def _animatediff() -> Replica:
    """AnimateDiff: an SD U-Net and a MotionAdapter merged into ``UNetMotionModel`` (temporal attention over 4
    frames, motion modules in every block and the mid block; ``proj_in(input=x)`` calls), AnimateDiff's DDIM (linear
    betas, linspace spacing), driven by ``prompt_embeds``. One level: the text cross-attention is in the mid block."""
    import diffusers as d

    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
                                  layers_per_block=1, down_block_types=("DownBlock2D",),
                                  up_block_types=("UpBlock2D",), cross_attention_dim=16, norm_num_groups=4,
                                  attention_head_dim=4).eval()
    torch.manual_seed(3)
    adapter = d.MotionAdapter(block_out_channels=(8,), motion_layers_per_block=1, motion_norm_num_groups=4,
                              motion_num_attention_heads=2, motion_max_seq_length=8)
    sched = d.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            timestep_spacing="linspace", steps_offset=1)
    pipe = d.AnimateDiffPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                 motion_adapter=adapter, scheduler=sched)
    calls = [{"prompt_embeds": _randn(1, 6, 16, seed=100 + i), "negative_prompt_embeds": _randn(1, 6, 16,
                                                                                                seed=200 + i),
              "height": 8, "width": 8, "num_frames": 4} for i in range(2)]
    return Replica(pipe, calls, {**calls[0], "output_type": "np"}, guidance_scale=3.0)


BUILDERS: dict[str, Callable[[], Replica]] = {"cogvideox": _cogvideox, "svd": _svd, "animatediff": _animatediff}
