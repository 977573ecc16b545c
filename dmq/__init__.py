"""dmq: post-training quantization for diffusion backbones (U-Net and DiT), INT and low-bit float formats."""

from dmq import formats

__version__ = "0.1.0"
__all__ = ["formats"]
