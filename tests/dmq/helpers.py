"""Tiny random-weight backbones and metrics shared by the dmq tests."""

from __future__ import annotations

import math

import diffusers
import torch
from torch import nn


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return float(10 * torch.log10(ref.double().pow(2).mean() / (ref.double() - out.double()).pow(2).mean()))


def format_sqnr_db(fmt_name: str) -> float:
    """A conservative closed-form SQNR of a Gaussian tensor quantized to ``fmt_name`` with a range fitted to it.

    INT b bits over a range of 2 x 3.5 sigma (the max of ~1e3 Gaussian samples): step^2 / 12 noise gives
    6.02 b - 7 dB. Minifloats with M mantissa bits: error uniform over a binade's step 2^(e-M) against a signal of
    mean square (7/3) 4^e gives 6.02 M + 14.5 dB, minus 8 dB for E = 2 (most of a Gaussian falls in few binades
    and subnormals) and 4 dB otherwise. Block formats: their element format minus 4 dB for the block scale.
    """
    name = fmt_name.lower()
    if name.startswith("int") or name.startswith("uint"):
        return 6.02 * int(name.lstrip("uint")) - 7.0
    if name in ("mxfp4", "nvfp4"):
        return format_sqnr_db("e2m1") - 4.0
    e, m = int(name[1]), int(name[3])
    return 6.02 * m + 14.5 - (8.0 if e == 2 else 4.0)


def combine_db(*dbs: float) -> float:
    """SQNR of independent noise sources added together."""
    return -10 * math.log10(sum(10 ** (-d / 10) for d in dbs))


def tiny_unet(seed: int = 0) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=11,
    ).eval()


def tiny_dit(seed: int = 0) -> diffusers.DiTTransformer2DModel:
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    ).eval()


def backbone_loop(model: nn.Module, timesteps, batch: int = 4, seed: int = 1):
    """A calibration loop: one call per timestep on fixed inputs, labels as keyword, timestep positional."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)

    def loop(m: nn.Module) -> list[torch.Tensor]:
        return [m(x, torch.full((batch,), float(t)), class_labels=labels).sample for t in timesteps]

    return loop


class TimeToy(nn.Module):
    """A backbone whose activations scale with the timestep: ``lin(x * (1 + t / 100))``."""

    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.lin(x * (1 + t / 100))
