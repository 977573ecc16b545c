"""scikit-learn's bundled 8x8 digits, upsampled to 16x16, with a fixed train / held-out split.

16x16 is the smallest size at which a U-Net with three resolutions (16, 8, 4) and a DiT with 2x2 patches (64
tokens) both have real structure to quantize, and training stays within minutes on two CPU cores. Images are
scaled from the digits' 0..16 range to [-1, 1] and upsampled bilinearly (no antialiasing is needed going up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = 10  # the unconditional label used by classifier-free guidance
IMAGE_SIZE = 16
HELD_OUT = 360  # about 20% of the 1,797 images, never seen in training
SPLIT_SEED = 0


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images ``(N, 1, 16, 16)`` float32 in [-1, 1], labels int64.

    ``split`` is ``"train"`` (1,437 images), ``"test"`` (the 360 held-out images) or ``"all"``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False) * 2 - 1
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    idx = {"train": perm[HELD_OUT:], "test": perm[:HELD_OUT], "all": torch.arange(len(y))}[split]
    return x[idx].contiguous(), y[idx].contiguous()
