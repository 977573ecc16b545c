"""Integer and FP8 GEMMs of frozen layers: exact integer sums, stated float bounds, CUDA paths (skipped on CPU)."""

import pytest
import torch

from dmq import formats, kernels
from dmq.fake_quant import fake_quant

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
U = 2.0**-24  # float32 unit roundoff


# K = 1: torch's CPU _int_mm returns wrong sums there
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 40, 24), (70, 33, 17), (5, 1, 16)])
def test_int_mm_is_exact(shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    out = kernels.int_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (6, False), (4, True)])
def test_activation_codes_are_the_fake_quantizer_codes(dtype, bits, signed):
    fmt = formats.IntFormat(bits, signed)
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(4, 300, generator=g) * 3).to(dtype)
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, 0.0]).to(dtype)  # ties and saturation
    scale = torch.tensor([[0.25], [0.03], [1.0], [0.5]])
    zp = None if signed else torch.tensor([[0.0], [3.0], [2 ** (bits - 1)], [7.0]])
    codes = kernels.act_codes(x, scale, zp, fmt.qmin, fmt.qmax)
    z = 0 if zp is None else zp.to(dtype)
    assert torch.equal((codes - z) * scale.to(dtype), fake_quant(x, fmt, scale, zp))


def _case(dtype, batch_bins):
    g = torch.Generator().manual_seed(0)
    b, t, k, n = 3, 5, 96, 40
    x = (torch.randn(b, t, k, generator=g) * torch.logspace(-1, 1, k)).to(dtype)
    w_codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g).to(dtype)
    if batch_bins:  # one scale and zero point per sample (its timestep bin)
        a_scale = torch.tensor([0.02, 0.05, 0.11]).reshape(3, 1, 1)
        a_zp = torch.tensor([120.0, 0, 255]).reshape(3, 1, 1)
    else:
        a_scale, a_zp = torch.tensor(0.04).reshape(1, 1, 1), torch.tensor(131.0).reshape(1, 1, 1)
    return x, w_codes, w_scale, bias, a_scale, a_zp


@pytest.mark.parametrize("batch_bins", [False, True])
def test_int_linear_sums_exactly_and_matches_fake_quant_within_the_float_bound(batch_bins):
    x, wc, ws, bias, s, z = _case(torch.float32, batch_bins)
    rowsum = wc.to(torch.int32).sum(1)
    y = kernels.int_linear(x, s, z, 8, False, wc, ws, rowsum, bias)
    # fake-quant reference: the float path of a frozen layer
    fmt = formats.IntFormat(8, False)
    xq = fake_quant(x, fmt, s, z)
    wq = wc.float() * ws.reshape(-1, 1)
    y_fq = torch.nn.functional.linear(xq, wq, bias)
    # exact value of the integer path before its last roundings, in float64
    codes = kernels.act_codes(x, s, z, 0, 255).double() - z.double()
    acc = codes @ wc.double().t()
    y_exact = acc * (s.double() * ws.double()) + bias.double()
    # integer path: float32(acc), the scale product, the product, the bias add: at most 4 roundings
    assert ((y.double() - y_exact).abs() <= 4 * U * (y_exact.abs() + bias.double().abs()) + 1e-30).all()
    # fake-quant path vs integer path: a K-term float32 dot product (gamma_K) of rounded operands, plus the above
    k = x.shape[-1]
    mag = xq.double().abs() @ wq.double().abs().t() + bias.double().abs()
    assert ((y.double() - y_fq.double()).abs() <= (k + 8) * U * mag).all()


def test_int_linear_in_bfloat16_stays_within_a_bf16_rounding():
    x, wc, ws, bias, s, z = _case(torch.bfloat16, True)
    y = kernels.int_linear(x, s, z, 8, False, wc, ws, wc.to(torch.int32).sum(1), bias)
    fmt = formats.IntFormat(8, False)
    xq = fake_quant(x, fmt, s, z)
    wq = (wc.float() * ws.reshape(-1, 1)).to(torch.bfloat16)
    y_fq = torch.nn.functional.linear(xq, wq, bias)
    mag = xq.double().abs() @ wq.double().abs().t() + bias.double().abs()
    # operands and output rounded to bfloat16 (2^-9 each) on the fake path, output rounded on the integer path
    assert y.dtype == torch.bfloat16 and ((y.double() - y_fq.double()).abs() <= 2.0**-7 * mag).all()


def test_disable_names_its_paths():
    with pytest.raises(ValueError, match="int_gemm"):
        with kernels.disable("int4_gemm"):
            pass
    with kernels.disable("int_gemm"):
        assert not kernels.enabled("int_gemm")
    assert kernels.enabled("int_gemm")


def test_fp8_path_declines_without_a_capable_gpu():
    x = torch.randn(4, 32)
    w = torch.randn(16, 32).to(torch.float8_e4m3fn)
    assert not kernels.fp8_supported(x.device)
    assert kernels.fp8_linear(x, torch.tensor(0.1), w, torch.ones(16), None) is None


@CUDA
def test_int_mm_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    for m in (1, 17, 64):
        a = torch.randint(-128, 128, (m, 64), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8)
        assert torch.equal(kernels.int_mm(a.cuda(), b.cuda()).cpu(), kernels.int_mm(a, b))


@CUDA
def test_fp8_scaled_mm_matches_the_dequantized_path():
    if not kernels.fp8_supported(torch.device("cuda")):
        pytest.skip("needs compute capability 8.9+")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g).cuda().bfloat16()
    w = (torch.randn(48, 64, generator=g) * 4).to(torch.float8_e4m3fn).cuda()
    ws = (torch.rand(48, generator=g) * 0.1 + 0.01).cuda()
    s = torch.tensor(0.02, device="cuda")
    y = kernels.fp8_linear(x, s, w, ws, None)
    xq = formats.get("e4m3").quantize(x.float() / s) * s
    ref = xq @ (w.float() * ws.reshape(-1, 1)).t()
    mag = xq.abs() @ (w.float() * ws.reshape(-1, 1)).abs().t()
    assert y is not None and ((y.float() - ref).abs() <= 2.0**-7 * mag + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt_name", ["uint8", "int8", "uint6", "int4", "e4m3", "e5m2"])
def test_fake_quant_shortcuts_are_the_grid_rounding_bit_for_bit(dtype, fmt_name):
    """INT: round and clamp on the CPU; FP8: torch's saturated float8 cast (the device shortcut), checked here."""
    fmt = formats.get(fmt_name)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 500, generator=g) * 40 * torch.logspace(-6, 4, 500)).to(dtype)  # subnormals to overflow
    x[0, :9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, float("inf"), -float("inf"), float("nan"), 1e4]).to(dtype)
    scale = torch.tensor([[0.5], [0.1], [3.0]])
    asym = isinstance(fmt, formats.IntFormat) and not fmt.signed
    zp = torch.tensor([[0.0], [17.0], [float(fmt.qmax)]]) if asym else None
    z = 0 if zp is None else zp.to(dtype)
    s = scale.to(dtype)
    generic = (fmt.quantize(x / s + z) - z) * s  # the format's own grid kernel
    if isinstance(fmt, formats.IntFormat):
        fast = fake_quant(x, fmt, scale, zp)
    else:
        from dmq.fake_quant import NATIVE_FP8

        fast = (x / s).clamp(-fmt.max, fmt.max).to(NATIVE_FP8[fmt_name]).to(dtype) * s
    assert torch.equal(fast.isnan(), generic.isnan())
    assert torch.equal(fast.nan_to_num(0.0), generic.nan_to_num(0.0))
