"""E4M3 and E5M2 fake quantization is bit-identical to PyTorch's float8 casts after the saturating clamp."""

import pytest
import torch

from dmq import formats

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)]


def native(x: torch.Tensor, fmt, f8: torch.dtype) -> torch.Tensor:
    return x.clamp(-fmt.max, fmt.max).to(f8).to(x.dtype)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    ia = a[~nan_a].view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b[~nan_b].view(torch.int16 if b.element_size() == 2 else torch.int32)
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} values differ, first: {a[~nan_a][bad[0]]} vs {b[~nan_b][bad[0]]}"


def random_inputs(fmt, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    anything = bits.view(torch.float32)  # every exponent, subnormals, inf and NaN included
    lo, hi = torch.log2(torch.tensor(fmt.min_subnormal)) - 3, torch.log2(torch.tensor(fmt.max)) + 2
    mag = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=g))
    in_range = mag * torch.sign(torch.randn(n, generator=g))
    return torch.cat([anything, in_range])


def ties_and_edges(fmt) -> torch.Tensor:
    grid = fmt.values().to(torch.float32)
    mid = (grid[1:].double() + grid[:-1].double()) / 2  # exact ties, representable in float32
    mid = mid.float()
    inf = torch.tensor([float("inf")])
    edges = torch.tensor([
        0.0, -0.0, fmt.min_subnormal, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, fmt.min_subnormal * 1.5,
        fmt.min_normal, fmt.max, fmt.max * 1.0625, fmt.max * 1.125, fmt.max * 2, float("nan"), 1e-45, 3e38,
    ])
    pts = torch.cat([grid, mid, torch.nextafter(mid, inf), torch.nextafter(mid, -inf), edges, -edges, inf, -inf])
    return pts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,f8", CASES, ids=[c[0] for c in CASES])
def test_random_values_match_native_cast(name, f8, dtype):
    fmt = formats.get(name)
    x = random_inputs(fmt, 2_000_000, seed=sum(map(ord, name))).to(dtype)
    assert_same_bits(fmt.quantize(x), native(x, fmt, f8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,f8", CASES, ids=[c[0] for c in CASES])
def test_ties_and_edge_cases_match_native_cast(name, f8, dtype):
    fmt = formats.get(name)
    x = ties_and_edges(fmt).to(dtype)
    assert_same_bits(fmt.quantize(x), native(x, fmt, f8))


@pytest.mark.parametrize("name,f8", CASES, ids=[c[0] for c in CASES])
def test_codes_are_torch_float8_bit_patterns(name, f8):
    fmt = formats.get(name)
    x = torch.cat([ties_and_edges(fmt), random_inputs(fmt, 100_000, seed=1)])
    finite = x[~torch.isnan(x)]
    assert torch.equal(fmt.encode(finite), native(finite, fmt, f8).to(f8).view(torch.uint8))
    codes = torch.arange(256, dtype=torch.uint8)
    assert_same_bits(fmt.decode(codes), codes.view(f8).to(torch.float32))


def test_named_conventions():
    e4m3, e5m2 = formats.get("e4m3"), formats.get("e5m2")
    assert (e4m3.max, e4m3.min_normal, e4m3.min_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    assert (e5m2.max, e5m2.min_normal, e5m2.min_subnormal) == (57344.0, 2.0**-14, 2.0**-16)
    assert float(torch.finfo(torch.float8_e4m3fn).max) == e4m3.max
    assert float(torch.finfo(torch.float8_e5m2).max) == e5m2.max
    assert (formats.get("e3m2").max, formats.get("e2m3").max, formats.get("e2m1").max) == (28.0, 7.5, 6.0)
    # NaN codes: E4M3FN only S.1111.111; E5M2 every S.11111.xx with xx != 0, and inf at S.11111.00
    e4_nan = torch.isnan(e4m3.decode(torch.arange(256, dtype=torch.uint8)))
    assert e4_nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    e5 = e5m2.decode(torch.arange(256, dtype=torch.uint8))
    assert torch.isinf(e5).nonzero().flatten().tolist() == [0x7C, 0xFC]
    assert torch.isnan(e5).sum() == 6
    for name in ("e3m2", "e2m3", "e2m1"):
        f = formats.get(name)
        assert torch.isfinite(f.decode(torch.arange(2**f.bits, dtype=torch.uint8))).all()


def test_e2m1_grid():
    fmt = formats.get("e2m1")
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert fmt.values().tolist() == sorted({-v for v in pos} | set(pos))
    assert fmt.bits == 4
    # codes 0..7 are the positive values in order, 8..15 their negatives
    assert fmt.decode(torch.arange(16, dtype=torch.uint8)).tolist() == pos + [-v for v in pos]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, 0.26, -100.0])
    assert fmt.quantize(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0, 0.5, -6.0]
