"""CPU fast paths of frozen Linear layers against the fake-quant reference: exact integer sums, stated float bounds
for the epilogues, fallback when a kernel is missing, and ``dmq.kernels.disable`` for every path."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import dmq
from dmq import formats, kernels, kernels_cpu, packed
from dmq.calibration import call_scope
from dmq.config import QuantSpec
from dmq.fake_quant import fake_quant
from dmq.modules import QuantConv2d
from dmq.packed import int_codes

U32 = 2.0**-24  # float32 unit roundoff
ONEDNN = pytest.mark.skipif(not kernels_cpu.onednn_int8_ok(), reason="oneDNN int8 linear unavailable")
INT4 = pytest.mark.skipif(not kernels_cpu.int4_weight_ok(), reason="int4pack kernel unavailable")


@ONEDNN
def test_onednn_int8_sums_are_exact_integers():
    g = torch.Generator().manual_seed(0)
    m, k, n = 37, 300, 24
    a = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    y = kernels_cpu.onednn_int8_linear(a, 1.0, 77, kernels_cpu.prepack_int8(w), torch.ones(n), None, torch.float32)
    exact = (a.long() - 77) @ w.long().t()  # |exact| < 2^24: float32 holds every sum exactly
    assert exact.abs().max() < 2**24 and torch.equal(y.double(), exact.double())


@ONEDNN
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_onednn_int8_epilogue_is_within_its_float_bound(out_dtype):
    g = torch.Generator().manual_seed(1)
    m, k, n = 9, 200, 40
    a = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g).to(out_dtype)
    y = kernels_cpu.onednn_int8_linear(a, 0.037, 128, kernels_cpu.prepack_int8(w), ws, bias, out_dtype)
    exact = ((a.double() - 128) @ w.double().t()) * (0.037 * ws.double()) + bias.double()
    # float32 epilogue: the conversion, the scale product and its application, the bias add (4 roundings), then
    # one rounding to the output dtype
    u_out = {torch.float32: U32, torch.bfloat16: 2.0**-8}[out_dtype]
    assert y.dtype == out_dtype
    assert ((y.double() - exact).abs() <= 4 * U32 * (exact.abs() + bias.double().abs()) + u_out * exact.abs()).all()


@INT4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_weight_kernel_dequantizes_inside_the_gemm(dtype):
    g = torch.Generator().manual_seed(2)
    m, k, n, gs = 7, 128, 32, 32
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // gs, generator=g) * 0.1 + 0.01).to(dtype).float()  # exact in dtype
    x = torch.randn(m, k, generator=g).to(dtype)
    packed, sz = kernels_cpu.prepack_int4(codes, scale, gs, dtype)
    y = kernels_cpu.int4_weight_linear(x, packed, sz, gs, None)
    w = (codes.double().reshape(n, -1, gs) * scale.double().unsqueeze(-1)).reshape(n, k)
    exact = x.double() @ w.t()
    mag = x.double().abs() @ w.abs().t()
    # float32 products and a K-term float32 sum (gamma_K), then one rounding to dtype
    u_out = {torch.float32: U32, torch.bfloat16: 2.0**-8}[dtype]
    assert ((y.double() - exact).abs() <= (k + 2) * U32 * mag + u_out * exact.abs()).all()
    assert kernels_cpu.prepack_int4(codes, scale, 48, dtype) is None  # a group size the kernel lacks: declined


def test_tiled_linear_is_the_whole_product_tile_by_tile(monkeypatch):
    monkeypatch.setattr(kernels_cpu, "TILE_MIN_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    seen = []

    def rows(r0, r1):
        seen.append((r0, r1))
        return w[r0:r1]

    y = kernels_cpu.tiled_linear(x, 300, rows, b, tile_elems=64 * 40)
    assert len(seen) == 10 and seen[0] == (0, 32) and seen[-1] == (288, 300)  # 32-row tiles, no full weight
    exact = x.double() @ w.double().t() + b.double()
    mag = x.double().abs() @ w.double().abs().t() + b.double().abs()
    assert ((y.double() - exact).abs() <= 66 * U32 * mag).all()


def test_tiled_linear_rounds_each_tile_to_the_input_dtype_and_multiplies_in_the_gemm_dtype():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 40, generator=g).to(torch.bfloat16)
    w = torch.randn(24, 40, generator=g) * (1 + 2.0**-12)  # float32 values between bfloat16 neighbours
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    y = kernels_cpu.tiled_linear(x, 24, lambda r0, r1: w[r0:r1], b, gemm_dtype=torch.float32)
    # one tile: the same float32 GEMM of the bfloat16-rounded weight, rounded once to bfloat16
    ref = torch.nn.functional.linear(x.float(), w.to(torch.bfloat16).float(), b.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_tile_gemm_dtype_is_float32_for_16_bit_inputs_without_amx(monkeypatch):
    kernels_cpu.tile_gemm_dtype.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True, raising=False)
    try:
        assert kernels_cpu.tile_gemm_dtype(torch.bfloat16) == torch.float32
        assert kernels_cpu.tile_gemm_dtype(torch.float16) == torch.float16  # AMX-FP16: multiply in 16 bits
        assert kernels_cpu.tile_gemm_dtype(torch.float32) == torch.float32
    finally:
        kernels_cpu.tile_gemm_dtype.cache_clear()


def _packed_layer(preset, k, dtype=torch.bfloat16, zero=False, n=40):
    torch.manual_seed(k)
    lin = nn.Linear(k, n).to(dtype)
    if zero:
        lin.weight.data.zero_()
    cfg = dmq.get_config(preset)  # round-to-nearest min-max weights: the kernels do not depend on the search
    cfg = cfg.replace(keep_fp=(), rounding="rtn", weight=dataclasses.replace(cfg.weight, estimator="minmax"))
    q = dmq.quantize(nn.Sequential(lin), cfg)
    dmq.calibrate(q, lambda m: m(torch.randn(4, k).to(dtype)))
    dmq.freeze(q)
    kernels.prepack_weights(q)  # the prepacked kernels' paths (test_prepacked_weights_are_opt_in: the default)
    return q[0]


# every storage the one-pass dequantization covers: 4-bit INT groups, FP8, NVFP4 and MX blocks, FP4 channels, INT8;
# K = 72 pads 4-bit rows to whole bytes and the groups and blocks past the row's end
@pytest.mark.parametrize("preset", ["w4a16", "fp8", "nvfp4", "mxfp4", "w4a8-fp", "w8a8"])
@pytest.mark.parametrize("k", [64, 72])
def test_row_dequantizer_is_the_reference_dequantization_bit_for_bit(preset, k):
    lin = _packed_layer(preset, k)
    part, lay = lin._part(0), lin.weight_layouts[0]
    rd = packed.row_dequantizer(part, lay)
    assert rd is not None
    for r0, r1 in ((0, 40), (8, 24), (39, 40)):
        assert torch.equal(rd.rows(r0, r1), packed._dequant_rows(part, lay, r0, r1)[:, :k])
    assert torch.equal(rd.rows(0, 40).to(torch.bfloat16), lin.dequantized_weight(torch.bfloat16))


# K = 1152 / 1160: rows of at least 512 stored bytes, where per-channel FP8 / FP4 rows are gathered from per-row
# tables; K = 72 and the group / block layouts take rows() and the casts
@pytest.mark.parametrize("preset", ["fp8", "w4a8-fp", "w4a16", "nvfp4", "w8a8"])
@pytest.mark.parametrize("k", [72, 1152, 1160])
def test_rows_rounded_in_the_gemm_dtype_are_the_rows_cast_twice(preset, k):
    lin = _packed_layer(preset, k)
    rd = packed.row_dequantizer(lin._part(0), lin.weight_layouts[0])
    for dtype in (torch.bfloat16, torch.float16):
        for r0, r1 in ((0, 40), (8, 24), (39, 40)):
            ref = rd.rows(r0, r1).to(dtype)
            assert torch.equal(rd.rows_in(r0, r1, dtype, torch.float32), ref.float())
            assert torch.equal(rd.rows_in(r0, r1, dtype, dtype).view(torch.int16), ref.view(torch.int16))


def test_row_dequantizer_zero_nvfp4_weight_and_declined_layouts():
    lin = _packed_layer("nvfp4", 64, zero=True)  # tensor scale 0: zeros whatever the block scales hold
    part, lay = lin._part(0), lin.weight_layouts[0]
    assert float(part["weight_scale2"]) == 0
    assert torch.equal(packed.row_dequantizer(part, lay).rows(0, 40), torch.zeros(40, 64))
    w6 = _packed_layer("w6a6", 64)  # 6-bit packing: the generic dequantization
    assert packed.row_dequantizer(w6._part(0), w6.weight_layouts[0]) is None


@pytest.mark.parametrize("preset", ["w4a16", "fp8", "nvfp4", "mxfp4"])
def test_weight_only_layers_take_the_tiled_path_within_its_bound(preset, monkeypatch):
    lin = _packed_layer(preset, 72)
    x = (torch.randn(3, 5, 72) * 2).to(torch.bfloat16)
    with torch.no_grad():
        with kernels.disable("all"):
            ref = lin(x)
        with kernels.disable("tiled_dequant", "int4_weight"):
            assert torch.equal(lin(x), ref)  # nothing else applies on a CPU: the reference, bit for bit
        w = lin.dequantized_weight(torch.bfloat16)
        xq = lin.input_quantizer(x) if lin.input_quantizer is not None else x
        # no full-weight dequantization on the fast path
        monkeypatch.setattr(type(lin), "dequantized_weight", lambda *a, **k: pytest.fail("full dequantization"))
        with kernels.disable("int4_weight"):
            fast = lin(x)
    exact = xq.double() @ w.double().t() + lin.bias.double()
    mag = xq.double().abs() @ w.double().abs().t() + lin.bias.double().abs()
    # the same bfloat16 weight and input, float32 products and a K-term float32 sum in both (gamma_{K+1}), each
    # rounded once to bfloat16
    for y in (fast, ref):
        assert ((y.double() - exact).abs() <= (72 + 1) * U32 * mag + 2.0**-8 * exact.abs()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_static_input_lookup_feeds_the_float32_gemm_bit_for_bit(dtype):
    q, x = _frozen("fp8", dtype, prepack=False)
    lin = q[0]
    aq = lin.input_quantizer
    with torch.no_grad():
        wide = aq.lookup_as(x, torch.float32)
        assert wide.dtype == torch.float32 and torch.equal(wide, aq(x).float())
        fast = lin(x)
        with kernels.disable("static_table"):  # the arithmetic quantizer, then the cast to the GEMM's dtype
            assert aq.lookup_as(x, torch.float32) is None
            assert torch.equal(lin(x).view(torch.int16), fast.view(torch.int16))
        with kernels.disable("tiled_dequant"):  # the reference: the same products, another summation order
            ref = lin(x)
        assert (fast.float() - ref.float()).abs().max() <= 2.0**-7 * ref.float().abs().max()
        # a 32-bit input, an input that needs a gradient and a dynamic quantizer take the usual paths
        assert aq.lookup_as(x.float(), torch.float32) is None
    x.requires_grad_()
    assert aq.lookup_as(x, torch.float32) is None
    nv, xn = _frozen("nvfp4", dtype, prepack=False)
    assert nv[0].input_quantizer.lookup_as(xn, torch.float32) is None


# ---------------------------------------------------------------------------------------------- layers
def _frozen(preset_or_cfg, dtype=torch.float32, k=64, seed=0, prepack=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, 96), nn.GELU(), nn.Linear(96, 48)).to(dtype)
    cfg = dmq.get_config(preset_or_cfg) if isinstance(preset_or_cfg, str) else preset_or_cfg
    if cfg.act is not None and not cfg.act.dynamic:  # one timestep bin: the model here has no timestep argument
        cfg = cfg.replace(act=QuantSpec(cfg.act.format, "tensor", symmetric=cfg.act.symmetric, timestep_bins=1))
    q = dmq.quantize(model, cfg.replace(keep_fp=()), inplace=False)
    x = (torch.randn(3, 10, k) * 2).to(dtype)
    dmq.calibrate(q, lambda m: m(x))
    dmq.freeze(q)
    if prepack:
        kernels.prepack_weights(q)
    return q, (torch.randn(3, 10, k) * 2).to(dtype)


@ONEDNN
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layer_paths_agree_with_the_exact_integer_result(preset, dtype):
    q, x = _frozen(preset, dtype)
    lin = q[0]
    assert lin.exec_path == "int_gemm"
    with torch.no_grad():
        fast = lin(x)
        with kernels.disable("onednn_int8"):
            mm = lin(x)
        with kernels.disable("onednn_int8", "static_table"):  # the codes computed, not looked up: the same sums
            assert torch.equal(lin(x), mm)
        with kernels.disable("all"):
            ref = lin(x)
        # the exact value of Q_a(x) Q_w(W)^T + b with the fake quantizer's own (dtype-rounded) scale
        aq = lin.input_quantizer
        s, z = aq.scale[0].to(dtype).double(), aq.zero_point[0].double()
        codes = kernels.act_codes(x, aq.scale[0].reshape(1, 1, 1), aq.zero_point[0].reshape(1, 1, 1), 0, 255)
        part = lin._part(0)
        w = int_codes(part, lin.weight_layouts[0]).double() * part["weight_scale"].double().reshape(-1, 1)
        exact = ((codes.double() - z) * s) @ w.t() + lin.bias.double()
    fq = fake_quant(x, formats.get("uint8"), aq.scale[0].reshape(1, 1, 1), aq.zero_point[0].reshape(1, 1, 1))
    assert torch.equal((codes - aq.zero_point[0].to(dtype)) * aq.scale[0].to(dtype), fq)  # the reference's codes
    # both integer paths: exact sums, float32 epilogue (4 roundings) and one rounding to dtype
    u_out = {torch.float32: U32, torch.bfloat16: 2.0**-8}[dtype]
    mag = exact.abs() + lin.bias.double().abs()
    for y in (fast, mm):
        assert y.dtype == dtype and ((y.double() - exact).abs() <= 4 * U32 * mag + u_out * exact.abs()).all()
    # the fake-quant reference: float operands rounded to dtype and a K-term float32 dot product (gamma_K)
    k = x.shape[-1]
    xq = ((codes.double() - z) * s)
    bound = (k + 8) * U32 + (3 * 2.0**-9 if dtype == torch.bfloat16 else 0.0)
    assert ((ref.double() - exact).abs() <= bound * (xq.abs() @ w.abs().t() + lin.bias.double().abs())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_path_epilogue_kept_per_bin_is_the_per_call_one(dtype):
    """The integer path keeps its epilogue constants (the scale product and the zero-point correction) for the last
    timestep bin; walking the bins back and forth gives bit for bit what int_linear computes from scratch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).to(dtype)
    cfg = dmq.get_config("w8a8")
    cfg = cfg.replace(act=QuantSpec("int8", "tensor", symmetric=False, timestep_bins=4), keep_fp=())
    q = dmq.quantize(model, cfg, inplace=False)
    x = (torch.randn(2, 7, 64) * 2).to(dtype)
    dmq.calibrate(q, lambda m: m(x))
    dmq.freeze(q)
    lin, aq = q[0], q[0].input_quantizer
    with torch.no_grad():  # a different scale and zero point in every bin
        aq.scale.mul_(torch.tensor([1.0, 0.5, 2.0, 1.5]).reshape(aq.scale.shape))
        aq.zero_point.copy_(torch.tensor([128.0, 100.0, 140.0, 90.0]).reshape(aq.zero_point.shape))
    part = lin._part(0)
    codes = int_codes(part, lin.weight_layouts[0])
    w_scale = part["weight_scale"].to(torch.float32).reshape(-1)
    results = {}
    with torch.no_grad():
        for t in (100.0, 600.0, 100.0, 900.0, 600.0):  # bins 0, 2, 0, 3, 2
            with call_scope(calibrating=False, timestep=torch.tensor([t])):
                b = aq.single_bin(x.shape[0])
                y = lin(x)
            s, z = aq.scale[b].reshape(1, 1, 1), aq.zero_point[b].reshape(1, 1, 1)
            ref = kernels.int_linear(x, s, z, 8, False, codes, w_scale, codes.to(torch.int32).sum(1), lin.bias)
            assert torch.equal(y, ref)
            results.setdefault(b, y)
            assert torch.equal(results[b], y)
    assert sorted(results) == [0, 2, 3] and not torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_paths_and_their_fallbacks(dtype):
    q, x = _frozen("w4a16", dtype)
    lin = q[0]
    with torch.no_grad():
        ref_w = lin.dequantized_weight(torch.float32).double()
        with kernels.disable("all"):
            ref = lin(x)
        fused = lin(x)
        with kernels.disable("int4_weight"):
            tiled = lin(x)
        kernels.cache_weights(q)
        cached = lin(x)
        assert kernels.cached_bytes(q) == 96 * 64 * torch.finfo(dtype).bits // 8  # built on first use: layer 0
        kernels.cache_weights(q, False)
        assert kernels.cached_bytes(q) == 0
    assert torch.equal(cached, ref)  # the cache is the reference's own weight
    exact = x.double() @ ref_w.t() + lin.bias.double()
    mag = x.double().abs() @ ref_w.abs().t() + lin.bias.double().abs()
    # reference and tiled: weight rounded to dtype, K-term float32 sum, output rounding; fused: exact weight
    u = {torch.float32: U32, torch.bfloat16: 2.0**-8}[dtype]
    for y in (ref, fused, tiled):
        assert ((y.double() - exact).abs() <= (66 * U32 + 2 * u) * mag).all()


@INT4
def test_int4_kernel_only_below_its_row_threshold(monkeypatch):
    lin = _packed_layer("w4a16", 64, n=64)  # a width the int4pack kernel takes
    x = torch.randn(3, 10, 64).to(torch.bfloat16)  # 30 input rows
    assert kernels._plan(lin, x.device, x.dtype).int4 is not None
    with torch.no_grad():
        with kernels.disable("int4_weight"):
            tiled = lin(x)
        fused = lin(x)
        monkeypatch.setattr(kernels_cpu, "INT4_MAX_ROWS", 30)  # 30 rows are no longer below it: the tiled path
        monkeypatch.setattr(kernels_cpu, "int4_weight_linear", lambda *a: pytest.fail("int4pack above threshold"))
        assert torch.equal(lin(x), tiled)
    assert not torch.equal(fused, tiled)  # two different kernels (the fused one multiplies the unrounded weight)


def test_fallback_when_kernels_are_missing(monkeypatch):
    """A CPU without the oneDNN int8 or int4pack kernels runs the next path: same integer sums, same reference."""
    q8, x8 = _frozen("w8a8")
    q4, x4 = _frozen("w4a16")
    with torch.no_grad():
        with kernels.disable("onednn_int8"):
            mm = q8(x8)
        with kernels.disable("int4_weight"):
            tiled = q4(x4)
        monkeypatch.setattr(kernels_cpu, "onednn_int8_ok", lambda: False)
        monkeypatch.setattr(kernels_cpu, "int4_weight_ok", lambda: False)
        for m in (q8, q4):
            kernels.prepack_weights(m)  # rebuilt where the kernels are missing
        assert q8[0].__dict__["_dmq_kernel_plans"].by_key and all(
            p.onednn is None for p in q8[0].__dict__["_dmq_kernel_plans"].by_key.values())
        assert torch.equal(q8(x8), mm) and torch.equal(q4(x4), tiled)


def test_disable_rejects_unknown_paths_and_restores():
    with pytest.raises(ValueError, match="onednn_int8"):
        with kernels.disable("int4_gemm"):
            pass
    with kernels.disable("all"):
        assert not any(kernels.enabled(p) for p in kernels.PATHS)
    assert all(kernels.enabled(p) for p in kernels.PATHS)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])  # the oneDNN / int4pack prepacked weights
def test_kernel_state_stays_out_of_the_state_dict_and_follows_reloads(preset):
    q, x = _frozen(preset)
    keys = set(q.state_dict())
    assert not any("kernel" in k or "rowsum" in k for k in keys)
    other, _ = _frozen(preset, seed=1)
    clone = copy.deepcopy(q)  # the copy builds its own kernel state
    with torch.no_grad():
        before = q(x)
        assert torch.equal(clone(x), before)
        q.load_state_dict(other.state_dict())  # copy_ into the same buffers: the kernel state is rebuilt
        after = q(x)
        assert torch.equal(after, other(x)) and not torch.equal(after, before)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w4a16"])
def test_prepacked_weights_are_opt_in(preset):
    """A frozen model holds no second copy of its weights until prepack_weights: the default runs the zero-copy
    path (torch._int_mm on the stored codes, the tiled dequantization), the copy is counted by kernel_bytes, and
    turning it off again frees it. deepcopy keeps the choice."""
    q, x = _frozen(preset, dtype=torch.bfloat16, prepack=False)
    lins = [q[0], q[2]]
    weights = sum(m.out_features * m.in_features for m in lins)
    with torch.no_grad():
        default = q(x)
        small = kernels.kernel_bytes(q)
        # row sums, scales and one 64 KiB activation-code table per layer, no weight
        assert small <= 16 * sum(m.out_features for m in lins) + 65536 * len(lins)
        plans = [p for m in lins for p in m.__dict__["_dmq_kernel_plans"].by_key.values()]
        assert plans and all(p.onednn is None and p.int4 is None for p in plans)
        assert kernels.prepack_weights(q) > 16 * sum(m.out_features for m in lins)  # a weight copy
        fast = q(x)
        copy_bytes = kernels.kernel_bytes(q)  # with what the first call built (oneDNN's activation code tables)
        with kernels.disable("onednn_int8", "int4_weight"):
            assert torch.equal(q(x), default)  # the default is the path the copies bypass
        if preset in ("w8a8", "w4a8") and kernels_cpu.onednn_int8_ok():
            # an int8 copy; the oneDNN path builds no int_linear epilogue (a float32 scale and an int32
            # correction per output, and the activation scale and offset), which the default path keeps
            assert copy_bytes >= small - 8 * sum(m.out_features + 1 for m in lins) + weights
        elif preset == "w4a16" and kernels_cpu.int4_weight_ok():
            assert copy_bytes >= small + weights // 2  # a 4-bit copy
        clone = copy.deepcopy(q)
        assert torch.equal(clone(x), fast) and kernels.kernel_bytes(clone) == copy_bytes
        kernels.prepack_weights(q, False)
        assert torch.equal(q(x), default) and kernels.kernel_bytes(q) == small
    with pytest.raises(TypeError, match="enabled must be a bool"):
        kernels.prepack_weights(q, "yes")


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "fp8", "nvfp4", "mxfp4", "w4a8-fp", "w4a16"])
def test_conv_weight_from_row_dequantizers_is_the_packed_weight_bit_for_bit(preset):
    """A frozen convolution without oneDNN's integer path dequantizes its weight through the plan's row
    dequantizers (both parts of a shortcut split), bit for bit the packed weight's own dequantization."""
    torch.manual_seed(0)
    cfg = dmq.get_config(preset).replace(keep_fp=())
    model = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 1)).to(torch.bfloat16)
    q = dmq.quantize(model, cfg, inplace=False)
    q[0] = QuantConv2d.from_float(model[0], cfg, split=8)  # a shortcut split: two weight parts
    x = torch.randn(2, 24, 6, 6, dtype=torch.bfloat16)
    dmq.calibrate(q, lambda m: m(x))
    dmq.freeze(q)
    assert len(q[0].weight_layouts) == 2
    with torch.no_grad():
        for conv in (q[0], q[2]):
            xi = torch.zeros(1, conv.in_channels, 2, 2, dtype=torch.bfloat16)
            ref = conv.dequantized_weight(torch.bfloat16)
            got = kernels._conv_weight(conv, kernels._plan(conv, xi.device, xi.dtype), xi)
            assert kernels._plan(conv, xi.device, xi.dtype).conv_rows  # the row path ran
            assert got.shape == ref.shape and torch.equal(got.view(torch.int16), ref.view(torch.int16))
        y = q(x)
        with kernels.disable("tiled_dequant"):
            assert torch.equal(q(x), y)


@pytest.mark.parametrize("preset", ["w8a8", "fp8"])
def test_split_input_in_one_joint_lookup_is_both_halves_bit_for_bit(preset):
    """A frozen shortcut-split convolution looks both halves of its input up in one joint table (the skip half's
    patterns offset into the second); walking the timestep bins rebuilds it, and a channels-last input, whose
    halves' layout the joint lookup would not keep, takes the two lookups."""
    torch.manual_seed(0)
    cfg = dmq.get_config(preset)
    cfg = cfg.replace(act=dataclasses.replace(cfg.act, timestep_bins=4), keep_fp=())
    conv = nn.Conv2d(24, 16, 3, padding=1).to(torch.bfloat16)
    q = nn.Sequential(QuantConv2d.from_float(conv, cfg, split=8))
    q._dmq = dmq.api.QuantState(cfg, None)
    x = torch.randn(2, 24, 6, 6, dtype=torch.bfloat16) * torch.logspace(-1, 1, 24, dtype=torch.bfloat16)[:, None, None]
    dmq.calibrate(q, lambda m: m(x))
    dmq.freeze(q)
    layer = q[0]
    with torch.no_grad():
        for qi in (layer.input_quantizer, layer.input_quantizer_skip):  # distinct scales per bin
            qi.scale.mul_(torch.tensor([1.0, 0.7, 1.3, 1.9]).reshape(qi.scale.shape))  # not powers of two (FP8)
        joint = {}
        for t in (100.0, 600.0, 100.0, 900.0):  # bins 0, 2, 0, 3
            with call_scope(calibrating=False, timestep=torch.tensor([t])):
                got = kernels._split_lookup(layer, kernels._plan(layer, x.device, x.dtype), x)
                ref = torch.cat([layer.input_quantizer(x[:, :8]), layer.input_quantizer_skip(x[:, 8:])], dim=1)
                assert got is not None and got.is_contiguous()
                assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
                joint.setdefault(t, got)
                assert torch.equal(joint[t], got)
                y = layer(x)
                with kernels.disable("static_table"):  # the quantizers' arithmetic, the same values
                    assert torch.equal(layer(x), y)
                cl = x.contiguous(memory_format=torch.channels_last)
                assert kernels._split_lookup(layer, kernels._plan(layer, cl.device, cl.dtype), cl) is None
        assert not torch.equal(joint[100.0], joint[600.0])
