"""Dense bit packing of format codes for storage.

One layout for every width: codes are laid end to end, least significant bit first, in a little-endian bit
stream, and byte ``k`` holds stream bits ``8k .. 8k+7``. So 4-bit codes go two per byte (even index in the low
nibble), 6-bit codes go four per three bytes, 8-bit codes are the bytes themselves, and no bit is wasted for any
width from 1 to 16. The widths 2, 4, 6 and 8 have vectorised fast paths; the rest expand to a bit matrix.
"""

from __future__ import annotations

import torch


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _check(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"packing supports 1..16-bit codes, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, each in ``[0, 2^bits)``) into a flat uint8 tensor."""
    _check(bits)
    c = codes.reshape(-1).to(torch.int32)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    n = c.numel()
    if bits == 8:
        return c.to(torch.uint8)
    if bits in (2, 4, 6):
        per = 4 if bits == 6 else 8 // bits  # codes per group; a group is 3 bytes for 6 bits, else one byte
        c = torch.nn.functional.pad(c, (0, -n % per)).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        word = (c << shifts).sum(-1, dtype=torch.int32)
        if bits == 6:
            word = torch.stack([word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF], -1)
        return word.reshape(-1).to(torch.uint8)[: packed_nbytes(n, bits)]
    bitmat = (c.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1
    stream = torch.nn.functional.pad(bitmat.reshape(-1), (0, -(n * bits) % 8)).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes, as int32."""
    _check(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed data must be a 1-D uint8 tensor")
    if packed.numel() < packed_nbytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    b = packed.to(torch.int32)
    if bits == 8:
        return b[:count].clone()
    if bits in (2, 4, 6):
        per = 4 if bits == 6 else 8 // bits
        if bits == 6:
            b = torch.nn.functional.pad(b, (0, -b.numel() % 3)).reshape(-1, 3)
            b = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return ((b.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    stream = ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits, dtype=torch.int32)).sum(-1, dtype=torch.int32)
