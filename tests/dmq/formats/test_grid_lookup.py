"""The CPU lookups of :func:`dmq.formats.round_to_grid` equal its arithmetic kernel bit for bit: every 16-bit pattern
of bfloat16 and float16, and float32 values through the round-to-odd step (ties, their neighbours, random bit
patterns with inf and NaN); the block formats built on them match with the lookups off."""

import pytest
import torch

from dmq import formats, kernels
from dmq.formats import grid
from tests.dmq.formats.test_fp8_exact import assert_same_bits, random_inputs

FORMATS = ["e4m3", "e5m2", "e2m1", "e3m2", "e2m3", "int8", "uint8", "int4"]
ODD = ["e4m3", "e5m2", "e2m1", "e3m2", "e2m3"]  # at most 5 mantissa bits: the float32 round-to-odd lookup


def kernel(fmt, x: torch.Tensor) -> torch.Tensor:
    with kernels.disable("grid_table"):
        return fmt.quantize(x)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_lookup_is_the_kernel_on_every_pattern(name, dtype):
    fmt = formats.get(name)
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype).reshape(256, 256)
    assert_same_bits(fmt.quantize(every), kernel(fmt, every))
    strided = every.t()  # any layout: the lookup reads bit patterns, not memory order
    assert_same_bits(fmt.quantize(strided), kernel(fmt, strided))


def ties_and_neighbours(fmt) -> torch.Tensor:
    vals = fmt.values().to(torch.float32)
    mids = ((vals[1:].double() + vals[:-1].double()) / 2).float()  # exact ties
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    pts = torch.cat([vals, mids])
    return torch.cat([pts, torch.nextafter(pts, up), torch.nextafter(pts, down), pts * 2.0**-130])


@pytest.mark.parametrize("name", ODD)
def test_float32_round_to_odd_lookup_is_the_kernel(name):
    fmt = formats.get(name)
    x = torch.cat([random_inputs(fmt, 100_000, seed=3), ties_and_neighbours(fmt)])
    got = fmt.quantize(x)
    assert_same_bits(got, kernel(fmt, x))
    assert_same_bits(fmt.quantize(-x), kernel(fmt, -x))


def test_float32_lookup_only_where_round_to_odd_holds():
    # int8 has 8 mantissa bits on its grid: a 16-bit intermediate would double-round, so the kernel runs
    x = torch.tensor([100.5, 101.5, 127.49998474121094, -3.5])
    assert torch.equal(formats.get("int8").quantize(x), torch.tensor([100.0, 102.0, 127.0, -4.0]))
    assert grid._ODD_MAX_MAN_BITS + 2 <= 7  # bfloat16 keeps 7 mantissa bits


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_formats_match_with_the_lookups_off(name, dtype):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(24, 80, generator=g) * torch.logspace(-3, 2, 80)).to(dtype)
    special = x.clone()
    special[0, 3], special[1, 17], special[2, 40] = float("nan"), float("inf"), -float("inf")
    for t in (x, special, torch.zeros_like(x), x[:, :37]):
        assert_same_bits(fmt.quantize(t), kernel(fmt, t))


def test_disable_restores_the_kernel_and_is_scoped():
    fmt = formats.get("e4m3")
    x = torch.randn(64).to(torch.bfloat16)
    with kernels.disable("grid_table"):
        assert not kernels.enabled("grid_table")
        assert "grid_table" in grid.DISABLED
    assert kernels.enabled("grid_table")
    assert_same_bits(fmt.quantize(x), kernel(fmt, x))


@pytest.mark.parametrize("offset, dtype", [(0, torch.uint16), (32768, torch.int16)])
def test_gather16_in_chunks_is_one_index_select(offset, dtype, monkeypatch):
    """Above its small size gather16 goes chunk by chunk through one reused index buffer; the result is the
    whole-tensor gather, at every length around the size and chunk boundaries."""
    monkeypatch.setattr(grid, "_GATHER_CHUNK", 1000)  # the scratch holds up to _CPU_CHUNK
    monkeypatch.setattr(grid, "_GATHER_SMALL", 500)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(65536, generator=g)
    for n in (1, 500, 501, 999, 1000, 1001, 3007):
        bits = torch.randint(0, 65536, (n,), generator=g, dtype=torch.int32).to(dtype)
        ref = table.index_select(0, bits.to(torch.int32) + offset)
        got = grid.gather16(table, bits, offset)
        assert got.shape == (n,) and torch.equal(got, ref)


def test_chunk_scratch_is_reused_per_thread_and_bounded():
    """The chunked kernels' work buffers are kept per thread and slot, grown to the largest chunk, and never above
    one chunk (a longer row gets a buffer of its own); results do not depend on what a buffer held before."""
    import threading

    a = grid._scratch("test", (4, 8), torch.float32)
    b = grid._scratch("test", (2, 8), torch.float32)
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
    c = grid._scratch("test", (64, 8), torch.float32)  # grows
    assert c.shape == (64, 8) and grid._scratch("test", (4, 8), torch.float32).data_ptr() == c.data_ptr()
    big = grid._scratch("test", (grid._CPU_CHUNK + 1,), torch.float32)
    assert big.data_ptr() != c.data_ptr() and grid._scratch("test", (8,), torch.float32).data_ptr() == c.data_ptr()
    other = []
    t = threading.Thread(target=lambda: other.append(grid._scratch("test", (4, 8), torch.float32).data_ptr()))
    t.start()
    t.join()
    assert other[0] != c.data_ptr()
    # the kernels that use them: the same result with the buffers full of garbage
    x = torch.randn(64, 4, 16, dtype=torch.bfloat16)
    s = x.abs().amax(-1, keepdim=True).float() / 6
    spec = formats.get("e2m1").grid
    ref = grid.round_scaled16(x, s, spec)
    for slot, dtype in (("w", torch.float32), ("s", torch.int32)):
        grid._scratch(slot, (grid._CPU_CHUNK,), dtype).fill_(7)
    assert torch.equal(grid.round_scaled16(x, s, spec), ref)


@pytest.mark.parametrize("name", ["e4m3", "e2m1", "int8"])
@pytest.mark.parametrize("path", ["lookup", "kernel"])
def test_gradient_is_straight_through_on_any_size(name, path):
    """Under autograd the values are those of the no-grad paths, bit for bit, and the derivative is 1 inside the
    grid's range and 0 where it saturates, on tensors of several kernel chunks too (the chunked in-place kernel
    broke autograd past the first chunk: a DC-ratio search on a W4A8 backbone with 32 latents raised)."""
    fmt = formats.get(name)
    x = torch.randn(3 * grid._CPU_CHUNK + 5, generator=torch.Generator().manual_seed(0)) * fmt.max * 0.6
    leaf = x.clone().requires_grad_(True)
    with kernels.disable(*(("grid_table",) if path == "kernel" else ())):
        y = fmt.quantize(leaf)
        assert_same_bits(y.detach(), fmt.quantize(x))
    (y * torch.arange(x.numel(), dtype=torch.float32)).sum().backward()
    inside = (x >= fmt.min) & (x <= fmt.max)
    assert 0 < int((~inside).sum()) < x.numel() // 5  # both cases occur
    assert torch.equal(leaf.grad, torch.where(inside, torch.arange(x.numel(), dtype=torch.float32), 0.0))
