"""Dynamic thresholding of ``x̂0`` (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep
Language Understanding" (Imagen), Sec. 2.3), as diffusers' ``thresholding=True`` option does it."""

from __future__ import annotations

import torch

__all__ = ["dynamic_threshold"]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per sample, ``s = clamp(quantile(|x̂0|, ratio), 1, max_value)``; returns ``clamp(x̂0, -s, s) / s``.

    Pixels beyond the ``ratio`` quantile are pulled in, and the sample is rescaled only when ``s > 1``, so that
    saturated pixels under strong guidance stay within ``[-1, 1]``.
    """
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs float32/64
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).to(flat.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
