"""Tiny backbones of the families the dmq backend is tested on, with dummy inputs: Flux, SD3, Wan, Qwen-Image,
PixArt, the SD U-Net and the bundled digits models. Configs follow diffusers' own model tests, made smaller."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    g = _g()
    inputs = {"hidden_states": torch.randn(1, 16, 4, generator=g),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "img_ids": torch.randn(16, 3, generator=g),
              "txt_ids": torch.randn(8, 3, generator=g), "timestep": torch.tensor([0.5])}
    return model, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    g = _g()
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([500])}
    return model, inputs


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    g = _g()
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([500])}
    return model, inputs


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                        guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    g = _g()
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=g),
              "encoder_hidden_states": torch.randn(1, 8, 16, generator=g),
              "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long), "timestep": torch.tensor([1.0]),
              "img_shapes": [(1, 4, 4)]}
    return model, inputs


def _pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                     out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6)
    g = _g()
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([500]),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return model, inputs


def _sd_unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                 attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    g = _g()
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 6, 16, generator=g)}
    return model, inputs


def _digits(kind: str):
    def build():
        from diffusers import DiTTransformer2DModel, UNet2DModel

        sub = "unet" if kind == "unet" else "transformer"
        cls = UNet2DModel if kind == "unet" else DiTTransformer2DModel
        model = cls.from_pretrained(ROOT / "assets" / f"digits-{kind}" / sub)
        ch = model.config.in_channels
        size = model.config.sample_size
        g = _g()
        return model, {("sample" if kind == "unet" else "hidden_states"): torch.randn(1, ch, size, size, generator=g),
                       "timestep": torch.tensor([500]), "class_labels": torch.tensor([3])}
    return build


FAMILIES = {"flux": _flux, "sd3": _sd3, "wan": _wan, "qwen-image": _qwen, "pixart": _pixart, "sd-unet": _sd_unet,
            "digits-unet": _digits("unet"), "digits-dit": _digits("dit")}


def build(name: str):
    """``(model, inputs)``: the float model (eval, seeded) and keyword inputs of one forward call."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    return model.eval(), inputs


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
