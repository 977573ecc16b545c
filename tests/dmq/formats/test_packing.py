"""Pack -> unpack is lossless at every width, the layout is the documented LSB-first stream, and sizes are dense."""

import pytest
import torch

from dmq import formats
from dmq.formats import pack, packed_nbytes, unpack


def stream_reference(codes: list[int], bits: int) -> list[int]:
    """The layout by definition: code i occupies bits [i*bits, (i+1)*bits) of a little-endian bit stream."""
    acc = sum(c << (i * bits) for i, c in enumerate(codes))
    return list(acc.to_bytes(packed_nbytes(len(codes), bits), "little"))


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 13, 1000])
def test_round_trip_and_layout(bits, count):
    g = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits)
    assert packed.tolist() == stream_reference(codes.tolist(), bits)
    assert torch.equal(unpack(packed, bits, count), codes.to(torch.int32))


def test_known_layouts():
    assert pack(torch.tensor([0x1, 0x2, 0x3]), 4).tolist() == [0x21, 0x03]  # even index in the low nibble
    # four 6-bit codes in three bytes: 0b000001 | 0b000010 << 6 | 0b000011 << 12 | 0b111111 << 18
    assert pack(torch.tensor([1, 2, 3, 63]), 6).tolist() == [0x81, 0x30, 0xFC]
    assert pack(torch.tensor([7, 255]), 8).tolist() == [7, 255]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="1..16"):
        pack(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, dtype=torch.uint8), 6, 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(3, dtype=torch.int32), 8, 3)


@pytest.mark.parametrize("name", [n for n in formats.names() if not formats.get(n).is_block])
def test_format_codes_survive_packing(name):
    fmt = formats.get(name)
    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)) * fmt.max / 2
    codes = fmt.encode(x)
    packed = pack(codes, fmt.bits)
    assert packed.numel() == packed_nbytes(x.numel(), fmt.bits)
    back = fmt.decode(unpack(packed, fmt.bits, x.numel()).reshape(x.shape))
    assert torch.equal(back, fmt.quantize(x))


def test_fp6_and_fp4_storage_density():
    x = torch.randn(1024)
    assert pack(formats.get("e3m2").encode(x), 6).numel() == 768  # 4 codes per 3 bytes
    assert pack(formats.get("e2m1").encode(x), 4).numel() == 512  # 2 codes per byte
