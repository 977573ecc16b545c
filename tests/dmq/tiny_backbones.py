"""Tiny random-weight denoising backbones of eight diffusers families, built from configs, with matching inputs.

The configs follow the small ones in diffusers' own model tests (``get_init_dict``); ``inputs(name, batch)`` gives
keyword arguments for one forward. They test structure (which layer is which), not quality.
"""

from __future__ import annotations

import torch

FAMILIES = ("dit", "pixart", "sd-unet", "flux", "wan", "qwen-image", "sd3", "sana")


def build(name: str) -> torch.nn.Module:
    import diffusers as d

    torch.manual_seed(0)
    if name == "dit":
        m = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                    norm_num_groups=1)
    elif name == "pixart":
        m = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                       num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                       caption_channels=12, norm_num_groups=1)
    elif name == "sd-unet":
        m = d.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                   out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                   attention_head_dim=4, norm_num_groups=4)
    elif name == "flux":
        m = d.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    elif name == "wan":
        m = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                    out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    elif name == "qwen-image":
        m = d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=4, joint_attention_dim=24,
                                          guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    elif name == "sd3":
        m = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                    pooled_projection_dim=12, out_channels=4)
    elif name == "sana":
        m = d.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
                                     num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                     cross_attention_dim=8, caption_channels=8, sample_size=8)
    else:
        raise ValueError(f"unknown family {name!r}; known: {FAMILIES}")
    return m.eval()


def inputs(name: str, batch: int = 2, seed: int = 0) -> dict:
    """Keyword arguments of one forward of ``build(name)`` on ``batch`` samples."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    t = torch.tensor([500.0, 100.0, 900.0, 300.0][:batch] * (1 + batch // 4))[:batch]
    if name == "dit":
        return {"hidden_states": r(batch, 4, 8, 8), "timestep": t.long(), "class_labels": torch.arange(batch) % 10}
    if name == "pixart":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 12), "timestep": t,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if name == "sd-unet":
        return {"sample": r(batch, 4, 8, 8), "timestep": t, "encoder_hidden_states": r(batch, 6, 16)}
    if name == "flux":
        return {"hidden_states": r(batch, 16, 4), "encoder_hidden_states": r(batch, 6, 32),
                "pooled_projections": r(batch, 32), "img_ids": r(16, 3), "txt_ids": r(6, 3),
                "timestep": t / 1000, "guidance": torch.full((batch,), 3.5)}
    if name == "wan":
        return {"hidden_states": r(batch, 4, 2, 8, 8), "encoder_hidden_states": r(batch, 6, 16), "timestep": t}
    if name == "qwen-image":
        return {"hidden_states": r(batch, 16, 16), "encoder_hidden_states": r(batch, 6, 24),
                "encoder_hidden_states_mask": torch.ones(batch, 6, dtype=torch.long), "timestep": t / 1000,
                "img_shapes": [(1, 4, 4)] * batch}
    if name == "sd3":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 16),
                "pooled_projections": r(batch, 12), "timestep": t}
    if name == "sana":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 8), "timestep": t}
    raise ValueError(f"unknown family {name!r}; known: {FAMILIES}")


def output(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    out = model(**kwargs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out
