"""The eager fast paths of the activation quantizers equal the computation they replace, bit for bit, and each one
turns off through ``dmq.kernels.disable``: absolute maxima on int16 bit patterns (``abs_amax``: NVFP4 / MX block
scales, per-token dynamic scales), MX blocks in bfloat16 (``mx_16bit``), NVFP4 / MX blocks quantized one cache-sized
chunk of rows at a time (``block_chunked``) and a static quantizer's fake quantization as one lookup per timestep
bin (``static_table``), including the memory layout it returns. Every test runs twice: with the fused C loops of
``dmq.native`` (path ``native16``) where they apply, and with their PyTorch form alone."""

from __future__ import annotations

import pytest
import torch

from dmq import formats, kernels
from dmq.calibration import call_scope
from dmq.config import QuantSpec
from dmq.fake_quant import fake_quant, fake_quant_lookup, fake_quant_table, quantize_rows_dynamic
from dmq.formats import grid
from dmq.quantizer import TensorQuantizer

SLOW = ("static_table", "abs_amax", "mx_16bit", "block_chunked")


@pytest.fixture(autouse=True, params=["native16", "pytorch"])
def fast_form(request):
    """The fast paths in their fused C form (where the library builds) and in their PyTorch form."""
    if request.param == "native16":
        yield
    else:
        with kernels.disable("native16"):
            yield


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def wide_range(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over many binades (down to bfloat16 subnormals for bfloat16), with zeros and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    lo = -135 if dtype == torch.bfloat16 else -20
    x = x * torch.exp2(torch.randint(lo, 12, (rows, 1), generator=g).float())
    x[0, :5] = 0.0
    x[1, :3] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_abs_amax_on_bit_patterns_is_the_float_reduction(dtype):
    every = grid.every16(dtype).reshape(-1, 16)  # every pattern: subnormals, zeros, inf, NaN
    got = grid.abs_amax(every)
    ref = every.abs().amax(-1, keepdim=True)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())
    x = wide_range(64, 48, dtype)
    assert same_bits(grid.abs_amax(x), x.abs().amax(-1, keepdim=True))
    assert grid.abs_amax(x.float()) is None  # 32-bit: the float reduction
    assert grid.abs_amax(x.clone().requires_grad_()) is None
    with kernels.disable("abs_amax"):
        assert grid.abs_amax(x) is None


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "mxfp8_e5m2", "mxfp6_e3m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_fast_paths_are_the_float32_computation(name, dtype):
    fmt = formats.get(name)
    x = wide_range(40, 96, dtype, seed=1)
    special = x.clone()
    special[3, 7], special[5, 20] = float("nan"), float("inf")
    cases = [x, -x, x.t(), special, torch.zeros_like(x), x[:, :37], x * 0 + 1e-30]
    for t in cases:
        with kernels.disable(*SLOW):
            ref = fmt.quantize(t)
        assert same_bits(fmt.quantize(t), ref)
        with kernels.disable(*SLOW):
            ref0 = fmt.quantize(t, dim=0)
        assert same_bits(fmt.quantize(t, dim=0), ref0)
    if name == "nvfp4":  # a calibrated tensor maximum
        with kernels.disable(*SLOW):
            ref = fmt.quantize(x, tensor_amax=3.0)
        assert same_bits(fmt.quantize(x, tensor_amax=3.0), ref)


def test_mx_bfloat16_path_keeps_zeros_signed_and_tiny_blocks_exact():
    fmt = formats.get("mxfp4")
    # a block of bfloat16 subnormals (scale clamps at 2^-127) and one whose small elements fall below 2^-126 / X
    tiny = torch.tensor([2.0**-133, -(2.0**-130), 3 * 2.0**-132, -0.0] * 8)
    mixed = torch.tensor([1.0e3, 2.0**-120, -(2.0**-126), 0.0] * 8)
    x = torch.stack([tiny, mixed]).to(torch.bfloat16)
    with kernels.disable("mx_16bit"):
        ref = fmt.quantize(x)
    got = fmt.quantize(x)
    assert same_bits(got, ref)
    assert torch.equal(got.signbit(), ref.signbit())


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "mxfp6_e2m3"])
@pytest.mark.parametrize("chunk", [96, 1000, 1 << 18])
def test_chunked_blocks_equal_the_whole_tensor_passes(name, chunk, monkeypatch):
    """Chunk sizes that split rows unevenly (a ragged last chunk), one block row per chunk, and one chunk."""
    monkeypatch.setattr(grid, "_CPU_CHUNK", chunk)
    fmt = formats.get(name)
    x = wide_range(37, 160, torch.bfloat16, seed=6)
    for t in (x, x.reshape(37, 5, 32), x.t(), x * 1e-30, torch.zeros_like(x)):
        with kernels.disable("block_chunked"):
            ref = fmt.quantize(t)
        assert same_bits(fmt.quantize(t), ref)
    if name == "nvfp4":
        with kernels.disable("block_chunked"):
            ref = fmt.quantize(x, tensor_amax=2.5)  # elements above the calibrated maximum saturate
        assert same_bits(fmt.quantize(x, tensor_amax=2.5), ref)


def test_chunked_kernels_decline_what_they_do_not_cover():
    spec = formats.get("e2m1").grid
    b = wide_range(4, 32, torch.bfloat16).reshape(4, 2, 16)
    d = torch.full((4, 2, 1), 0.37)
    assert grid.round_scaled16(b.float(), d, spec) is None  # a 32-bit input
    assert grid.round_scaled16(b, d.double(), spec) is None
    assert grid.round_scaled16(b, d, formats.get("e4m7").grid) is None  # too many mantissa bits for round-to-odd
    assert grid.round_scaled16(b, d[:1], spec) is None  # a divisor that broadcasts is left to the reference
    assert grid.round_scaled16(b[:, :0], d[:, :0], spec) is None
    assert grid.round_scaled16(b.reshape(-1), d.reshape(-1), spec) is None
    three = torch.full((4, 2, 1), 3.0, dtype=torch.bfloat16)
    assert grid.round_div16(b, three.float(), spec) is None  # the scale in another dtype
    assert grid.round_div16(b, three[:, :1], spec) is None  # a scale that broadcasts is left to the reference
    with kernels.disable("block_chunked"):
        assert grid.round_scaled16(b, d, spec) is None
    exact = (b.float() / d).to(torch.float32)
    ref = (formats.get("e2m1").quantize(exact) * d).to(torch.bfloat16)
    assert same_bits(grid.round_scaled16(b, d, spec), ref)


@pytest.mark.parametrize("name,granularity", [("e4m3", "token"), ("e3m2", "token"), ("int8", "tensor"),
                                              ("e4m3", "group")])
def test_dynamic_symmetric_scales_from_bit_patterns(name, granularity):
    fmt = formats.get(name)
    x = wide_range(32, 64, torch.bfloat16, seed=2)
    special = x.clone()
    special[4, 9], special[6, 1] = float("nan"), -float("inf")
    for t in (x, special, torch.zeros_like(x)):
        with kernels.disable("abs_amax", "block_chunked"):
            ref = quantize_rows_dynamic(t, fmt, granularity, 16, True)
        assert same_bits(quantize_rows_dynamic(t, fmt, granularity, 16, True), ref)


@pytest.mark.parametrize("name,granularity", [("e4m3", "token"), ("e3m2", "group"), ("e2m1", "tensor")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_float_rows_equal_the_whole_tensor_passes(name, granularity, dtype, monkeypatch):
    monkeypatch.setattr(grid, "_CPU_CHUNK", 200)  # several rows' groups per chunk, a ragged last chunk
    fmt = formats.get(name)
    x = wide_range(45, 64, dtype, seed=7)
    x[4, 9] = float("nan")
    for t in (x, x * 1e-3):
        with kernels.disable("block_chunked"):
            ref = quantize_rows_dynamic(t, fmt, granularity, 16, True)
        got = quantize_rows_dynamic(t, fmt, granularity, 16, True)
        assert torch.equal(got.isnan(), ref.isnan())
        assert same_bits(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("name,symmetric", [("e4m3", True), ("int8", True), ("uint8", False), ("e2m1", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_static_table_is_fake_quant_in_values_and_layout(name, symmetric, dtype):
    fmt = formats.get(name)
    scale = torch.tensor(0.0213)
    zp = None if symmetric else torch.tensor(117.0)
    table = fake_quant_table(fmt, scale, zp, dtype)
    every = grid.every16(dtype).reshape(256, 256)
    x = (torch.randn(2, 5, 4, 24, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    for t in (every, x, x.transpose(1, 2), x.permute(0, 2, 3, 1), x[..., ::2]):
        ref = fake_quant(t, fmt, scale.to(dtype), None if zp is None else zp.to(dtype))
        got = fake_quant_lookup(t, fmt, table)
        assert torch.equal(got.isnan(), ref.isnan())
        assert same_bits(got.nan_to_num(), ref.nan_to_num())
        assert got.stride() == ref.stride()  # the matmul after it sees the same operand layout


def test_quantizer_uses_the_table_per_bin_and_rebuilds_it_after_a_reload():
    q = TensorQuantizer(QuantSpec("uint8", "tensor", symmetric=False, timestep_bins=2))
    q.freeze((torch.tensor([0.02, 0.05]), torch.tensor([10.0, 128.0])))
    x = (torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    with call_scope(calibrating=False, timestep=torch.full((3,), 900.0)):
        fast = q(x)
        with kernels.disable("static_table"):
            ref = q(x)
        assert same_bits(fast, ref) and len(q._dmq_bin_tables) == 1
        with call_scope(calibrating=False, timestep=torch.full((3,), 100.0)):  # another bin: its own table
            assert same_bits(q(x), fake_quant(x, q.fmt, *q.static_params(x)))
        assert len(q._dmq_bin_tables) == 1  # one table per dtype, the last bin used
        q.scale.copy_(torch.tensor([0.02, 0.01]))  # load_state_dict copies in place
        again = q(x)
        s, z = q.static_params(x)
        assert same_bits(again, fake_quant(x, q.fmt, s, z)) and not same_bits(again, fast)
    # a float32 input and an input that needs a gradient take the arithmetic
    with call_scope(calibrating=False, timestep=torch.full((3,), 900.0)):
        assert torch.equal(q(x.float()), fake_quant(x.float(), q.fmt, *q.static_params(x)))


def test_every_new_path_is_listed_and_scoped():
    for p in SLOW:
        assert p in kernels.PATHS
        with kernels.disable(p):
            assert not kernels.enabled(p)
        assert kernels.enabled(p)
