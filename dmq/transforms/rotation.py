"""Orthogonal rotation of Linear inputs (QuaRot, Ashkboos et al., 2024; OstQuant): ``x W^T = (x R)(W R)^T`` for
orthogonal ``R``. Rotating spreads outlier channels over all channels, so per-tensor and per-channel grids fit
better. Here ``R`` is applied online to the input (the module's ``rotation`` buffer) and folded into the weight
before quantization: exact in full precision, one small matmul per call at inference.
"""

from __future__ import annotations

import torch


def hadamard(n: int) -> torch.Tensor:
    """Normalised Walsh-Hadamard matrix of order ``n`` (a power of two), Sylvester's construction."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def block_hadamard(n: int) -> torch.Tensor:
    """Block-diagonal Hadamard rotation of order ``n``: blocks of the largest power of two dividing ``n``."""
    b = n & -n
    return torch.block_diag(*[hadamard(b)] * (n // b))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri, 2007)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    if kind == "hadamard":
        return block_hadamard(n)
    if kind == "orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"rotation must be 'hadamard' or 'orthogonal', got {kind!r}")
