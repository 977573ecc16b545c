"""A small CNN for 16x16 digits: its logits measure class fidelity, its penultimate layer is the FID feature space.

It is a diffusers ``ModelMixin``, so it saves and loads with ``save_pretrained`` / ``from_pretrained`` like the
diffusion models in ``assets/``.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class DigitClassifier(ModelMixin, ConfigMixin):
    """Three convolutions, a ``num_features``-wide penultimate layer and a linear head. Inputs are in [-1, 1]."""

    @register_to_config
    def __init__(self, num_classes: int = 10, num_features: int = 64, width: int = 32, image_size: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, num_features), nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, num_features)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
