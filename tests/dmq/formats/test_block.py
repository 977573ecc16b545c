"""MX and NVFP4 against references written here from the OCP MX v1.0 rule and the NVFP4 recipe."""

import math

import numpy as np
import pytest
import torch

from dmq import formats
from tests.dmq.formats.reference import nearest_even

MX = ["mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4"]
EMAX_ELEM = {"mxfp8": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp4": 2}  # OCP MX table


def mx_reference(x: np.ndarray, name: str) -> np.ndarray:
    """Per block of 32 along the last axis: X = 2^(floor(log2 amax) - emax_elem), E8M0-clamped; P = RNE(V/X)."""
    fmt = formats.get(name)
    grid = fmt.element.values().numpy()
    out = np.empty_like(x, dtype=np.float64)
    for row in np.ndindex(x.shape[:-1]):
        v = x[row].astype(np.float64)
        for start in range(0, v.size, 32):
            blk = v[start:start + 32]
            finite = blk[np.isfinite(blk)]
            amax = np.abs(finite).max() if finite.size else 0.0
            e = math.floor(math.log2(amax)) - EMAX_ELEM[name] if amax > 0 else -127
            scale = 2.0 ** min(max(e, -127), 127)
            out[row][start:start + 32] = nearest_even(blk / scale, grid) * scale
    return out


def test_mx_scale_rule_constants():
    for name, emax in EMAX_ELEM.items():
        fmt = formats.get(name)
        assert fmt.element.emax == emax and fmt.block_size == 32
    assert formats.get("mxfp4").bits_per_element == 4.25


@pytest.mark.parametrize("name", MX)
def test_mx_matches_reference(name):
    g = torch.Generator().manual_seed(3)
    # rows of varied scale, a width of 70 = two full blocks and a partial one
    x = torch.randn(6, 70, generator=g) * torch.logspace(-30, 30, 6).unsqueeze(1)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 3] = 1e6  # one outlier flattens the rest of its block
    x[2, 5] = float("nan")
    x[3, 40] = float("inf")
    x[4, 64:] = 2.0**-140  # tiny block: the E8M0 exponent clamps at -127
    x[5, :32] = torch.linspace(-7.9, 7.9, 32)  # amax/X just under 8: the floor rule saturates FP4 at 6
    q = formats.get(name).quantize(x)
    ref = torch.from_numpy(mx_reference(x.numpy(), name)).float()
    torch.testing.assert_close(q, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", MX)
def test_mx_along_other_dims_and_dtypes(name):
    fmt = formats.get(name)
    x = torch.randn(40, 3, 33, generator=torch.Generator().manual_seed(4))
    q0 = fmt.quantize(x, dim=0)
    assert torch.equal(q0, fmt.quantize(x.movedim(0, -1)).movedim(-1, 0))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(fmt.quantize(x.to(dtype)), fmt.quantize(x.to(dtype).float()).to(dtype))


@pytest.mark.parametrize("name", MX)
def test_mx_encode_decode(name):
    fmt = formats.get(name)
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(5)) * 10
    codes, scales = fmt.encode(x)
    assert codes.shape == (5, 4, 32) and scales.shape == (5, 4) and scales.dtype == torch.uint8
    assert torch.equal(fmt.decode(codes, scales, n=100), fmt.quantize(x))
    with pytest.raises(ValueError, match="E8M0"):
        fmt.decode(codes, torch.full_like(scales, 255))


def e4m3_round(v: np.ndarray) -> np.ndarray:
    return nearest_even(v, formats.get("e4m3").values().numpy())


def nvfp4_reference(x: np.ndarray, tensor_amax=None) -> np.ndarray:
    """The NVFP4 recipe in float32 arithmetic, block by block (16 along the last axis)."""
    f32 = np.float32
    grid = formats.get("e2m1").values().numpy()
    finite = x[np.isfinite(x)]
    amax = f32(np.abs(finite).max()) if tensor_amax is None else f32(tensor_amax)
    s_t = f32(amax / f32(448 * 6))
    out = np.empty_like(x)
    for row in np.ndindex(x.shape[:-1]):
        v = x[row]
        for start in range(0, v.size, 16):
            blk = v[start:start + 16]
            fin = blk[np.isfinite(blk)]
            amax_b = f32(np.abs(fin).max()) if fin.size else f32(0)
            ratio = np.clip(f32(f32(amax_b / f32(6)) / s_t), f32(2.0**-9), f32(448))
            s_b = f32(e4m3_round(np.array([ratio]))[0])
            denom = f32(s_b * s_t)
            q = nearest_even((blk / denom).astype(np.float32).astype(np.float64), grid).astype(np.float32)
            out[row][start:start + 16] = q * denom
    return out


def test_nvfp4_matches_reference():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 50, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [1e4]])
    x[1, 7] = float("nan")
    x[2, :16] = 0.0
    q = formats.get("nvfp4").quantize(x)
    ref = torch.from_numpy(nvfp4_reference(x.numpy()))
    torch.testing.assert_close(q, ref, rtol=0, atol=0, equal_nan=True)


def test_nvfp4_with_calibrated_tensor_amax():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7)) * 5
    fmt = formats.get("nvfp4")
    # a static amax below the data: block scales clamp at 448 and elements saturate at 6
    for amax in (1.0, 20.0, 1000.0):
        q = fmt.quantize(x, tensor_amax=amax)
        ref = torch.from_numpy(nvfp4_reference(x.numpy(), tensor_amax=amax))
        torch.testing.assert_close(q, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tensor amax"):
        fmt.quantize(x, tensor_amax=float("inf"))


def test_nvfp4_encode_decode_and_zero_tensor():
    fmt = formats.get("nvfp4")
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    codes, scales, s_t = fmt.encode(x)
    assert codes.shape == (3, 3, 16) and scales.dtype == torch.uint8 and s_t.dtype == torch.float32
    assert torch.equal(fmt.decode(codes, scales, s_t, n=40), fmt.quantize(x))
    z = torch.zeros(2, 16)
    z[0, 0] = float("nan")
    qz = fmt.quantize(z)
    assert torch.isnan(qz[0, 0]) and (qz.flatten()[1:] == 0).all()
    assert fmt.bits_per_element == 4.5


def test_block_error_is_bounded_by_the_element_grid():
    """|x - q| <= X * max(half the largest element step, 2^(emax+1) - max): rounding, or the saturation the floor
    rule allows when amax / X reaches past the element maximum."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    for name in MX:
        fmt = formats.get(name)
        q = fmt.quantize(x)
        e = fmt.scale_exponents(x).squeeze(-1)  # (64, 8)
        scale = torch.exp2(e.double()).repeat_interleave(32, -1)
        elem = fmt.element.values()
        bound = max(float((elem[1:] - elem[:-1]).max()) / 2, 2.0 ** (fmt.element.emax + 1) - fmt.element.max)
        err = (q - x).abs().double()
        assert (err <= scale * bound).all()
