"""A small random-weight replica of a Flux.1 text-to-image pipeline, built from configs (no hub, no text encoders).

For demos and integration runs only: the weights are random (seeded), so its images are patterns, not pictures, and
they say nothing about image quality. What it does have is Flux's real structure: diffusers' ``FluxPipeline`` and
``FluxTransformer2DModel`` (double-stream and single-stream blocks, rotary embeddings, a flow-matching transformer fed
``t / 1000`` with dynamic shifting of the schedule), 2x2-packed VAE latents and a VAE decoder, driven by
``prompt_embeds`` / ``pooled_prompt_embeds`` in place of the T5 and CLIP text encoders. Quantization, samplers and
save/load all run on it as on the real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FluxReplicaConfig", "flux_prompts", "tiny_flux_pipeline"]


@dataclass(frozen=True)
class FluxReplicaConfig:
    """Sizes of the replica. ``sum(axes_dims_rope)`` must equal ``head_dim`` (Flux's rotary embedding)."""

    image_size: int = 32  # pixels; the VAE halves it and Flux packs 2x2 latent patches: (image_size / 4)^2 tokens
    layers: int = 2  # double-stream (MMDiT) blocks
    single_layers: int = 2  # single-stream blocks
    heads: int = 4
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    text_dim: int = 64  # T5 width stand-in (joint_attention_dim)
    pooled_dim: int = 32  # CLIP pooled width stand-in
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "layers", "single_layers", "heads", "head_dim", "text_dim",
                     "pooled_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FluxReplicaConfig.{name} must be an int >= 1, got {v!r}")
        if self.image_size % 4:
            raise ValueError(f"FluxReplicaConfig.image_size must be a multiple of 4 (VAE x2, packing x2), "
                             f"got {self.image_size}")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"FluxReplicaConfig.axes_dims_rope {self.axes_dims_rope} must sum to head_dim "
                             f"{self.head_dim}")


def tiny_flux_pipeline(config: FluxReplicaConfig | None = None):
    """A ``diffusers.FluxPipeline`` with random weights (seeded by ``config.seed``), text encoders left out."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    cfg = config or FluxReplicaConfig()
    torch.manual_seed(cfg.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=cfg.layers, num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim, axes_dims_rope=cfg.axes_dims_rope).eval()
    torch.manual_seed(cfg.seed + 1)
    # two resolutions: the VAE scale factor is 2; 4 latent channels become Flux's 16 after 2x2 packing
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=cfg.image_size, scaling_factor=1.0,
                        shift_factor=0.0).eval()
    tokens = (cfg.image_size // 4) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=max(1, tokens // 4), max_image_seq_len=tokens * 4)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompts(pipe, n: int, seed: int = 0, tokens: int = 8) -> list[dict]:
    """``n`` random stand-in prompts for ``pipe`` (:func:`tiny_flux_pipeline`): one dict of call arguments each
    (``prompt_embeds`` of ``tokens`` tokens, ``pooled_prompt_embeds``, ``height``, ``width``), seeded ``seed + i``."""
    for name, v in (("n", n), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    tr = pipe.transformer.config
    size = pipe.vae.config.sample_size
    size = size if isinstance(size, int) else size[0]
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append({"prompt_embeds": torch.randn(1, tokens, tr.joint_attention_dim, generator=g),
                    "pooled_prompt_embeds": torch.randn(1, tr.pooled_projection_dim, generator=g),
                    "height": size, "width": size})
    return out
