"""Packed weights: exact round trips, frozen == fake-quant for every preset, resident bytes, restore after packing."""

import copy

import pytest
import torch
from torch import nn

import dmq
from dmq import formats
from dmq.config import QuantSpec
from dmq.fake_quant import quantize_weight, weight_qparams
from dmq.packed import pack_weight, unpack_codes, unpack_weight
from dmq.packed_weight import PackedWeight
from tests.dmq.helpers import backbone_loop, tiny_dit, tiny_unet

WEIGHT_SPECS = [
    QuantSpec("int8", "channel", estimator="mse"), QuantSpec("int4", "channel"), QuantSpec("int6", "channel"),
    QuantSpec("int3", "group", group_size=8), QuantSpec("int2", "tensor"), QuantSpec("int4", "group", group_size=32),
    QuantSpec("int5", "channel", symmetric=False), QuantSpec("int8", "group", group_size=16, symmetric=False),
    QuantSpec("e4m3", "channel"), QuantSpec("e5m2", "tensor"), QuantSpec("e2m1", "channel", estimator="fp_bias"),
    QuantSpec("e3m2", "channel"), QuantSpec("e2m3", "group", group_size=16), QuantSpec("mxfp4", "block"),
    QuantSpec("mxfp6_e3m2", "block"), QuantSpec("mxfp8", "block"), QuantSpec("nvfp4", "block"),
]


def _reference(w, spec):
    return quantize_weight(w, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)


@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{int(s.symmetric)}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_is_the_fake_quant_weight_bit_for_bit(spec, dtype):
    torch.manual_seed(0)
    w = (torch.randn(12, 5, 3, 3) * torch.logspace(-3, 1, 12).reshape(-1, 1, 1, 1)).to(dtype)  # 45 cols: pads
    w[3, 0, 0, 0] = 0.0
    ref = _reference(w, spec)
    tensors, layout = pack_weight(w, spec, target=ref)
    out = unpack_weight(tensors, layout)
    assert out.dtype == dtype and torch.equal(out, ref)
    for name, (shape, dt) in layout.expected().items():
        assert tuple(tensors[name].shape) == tuple(shape) and tensors[name].dtype == dt
    # the declared storage really is dense: bits per code, rounded up per row to whole bytes
    q = tensors["qweight"]
    row_codes = layout.padded_cols if spec.fmt.bits == 8 else -(-layout.padded_cols // 8) * 8
    assert q.numel() * q.element_size() == 12 * row_codes * spec.fmt.bits // 8


def test_storage_dtypes_follow_the_format():
    w = torch.randn(8, 64)
    dt = {s: pack_weight(w, QuantSpec(s, "block" if s in ("mxfp4", "nvfp4") else "channel"))[0] for s in
          ("int8", "e4m3", "e5m2", "int4", "e2m1", "mxfp4", "nvfp4")}
    assert dt["int8"]["qweight"].dtype == torch.int8 and dt["int8"]["qweight"].shape == (8, 64)
    assert dt["e4m3"]["qweight"].dtype == torch.float8_e4m3fn and dt["e5m2"]["qweight"].dtype == torch.float8_e5m2
    for s in ("int4", "e2m1", "mxfp4", "nvfp4"):
        assert dt[s]["qweight"].dtype == torch.uint8 and dt[s]["qweight"].shape == (8, 32)  # two codes per byte
    assert dt["mxfp4"]["weight_scale"].dtype == torch.uint8 and dt["mxfp4"]["weight_scale"].shape == (8, 2)
    assert dt["nvfp4"]["weight_scale"].dtype == torch.float8_e4m3fn and dt["nvfp4"]["weight_scale"].shape == (8, 4)
    assert dt["nvfp4"]["weight_scale2"].dtype == torch.float32
    # group scales are rounded to float16 by the search, so they are stored in two bytes
    g = pack_weight(w, QuantSpec("int4", "group", group_size=32))[0]["weight_scale"]
    assert g.dtype == torch.float16 and g.shape == (8, 2)


def test_unpack_codes_inverts_dense_packing_for_every_width():
    from dmq.packed import WeightLayout, _store_codes

    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (5, 37), generator=g, dtype=torch.uint8)
        storage = "uint8" if bits == 8 else f"packed{bits}"
        lay = WeightLayout(f"uint{bits}", "channel", 128, False, (5, 37), "float32", storage, 37, "float32")
        assert torch.equal(unpack_codes(_store_codes(codes, storage, bits), lay), codes)


def test_off_grid_weight_cannot_be_packed():
    w = torch.randn(4, 16)
    spec = QuantSpec("int4", "channel")
    bad = _reference(w, spec).clone()
    bad[0, 0] += 1e-3
    with pytest.raises(ValueError, match="not on the int4 grid"):
        pack_weight(w, spec, target=bad)


def test_learned_rounding_is_packed_from_the_layer_weight():
    # AdaRound/GPTQ leave weight_fq on the grid of the RTN scales but not at the nearest point: pack it as it is
    w = torch.randn(6, 32)
    spec = QuantSpec("int4", "channel")
    ref = _reference(w, spec)
    _, scale, _ = weight_qparams(w, spec.fmt, "channel", 128, True, "minmax")
    step = scale.reshape(-1, 1)
    codes = (ref / step).round()
    codes = (codes + (torch.rand_like(ref) < 0.2) * torch.sign(w - ref)).clamp(-8, 7)  # a neighbour grid point
    learned = codes * step
    assert not torch.equal(learned, ref)
    tensors, layout = pack_weight(w, spec, target=learned)
    assert torch.equal(unpack_weight(tensors, layout), learned)


def _layer_deviation(packed, loop) -> float:
    """The largest relative difference of any quantized Linear's output on its fast path from the reference on the
    same input, over one run of ``loop``."""
    from dmq.modules import QuantLinear

    worst, busy = [0.0], []

    def hook(mod, args, out):
        if busy:
            return
        busy.append(1)
        with dmq.kernels.disable("all"):
            ref = mod(args[0])
        busy.pop()
        worst[0] = max(worst[0], float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)))

    handles = [m.register_forward_hook(hook) for m in packed.modules() if isinstance(m, QuantLinear)]
    try:
        with torch.no_grad():
            loop(packed)
    finally:
        for h in handles:
            h.remove()
    return worst[0]


def _frozen_pair(preset, build, steps=(900, 100)):
    model = build()
    loop = backbone_loop(model, list(steps))
    calibrated = dmq.calibrate(dmq.quantize(model, preset), loop)
    fake = dmq.freeze(copy.deepcopy(calibrated), pack=False)
    return fake, dmq.freeze(calibrated), loop


@pytest.mark.parametrize("preset", dmq.preset_names())
@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_frozen_matches_fake_quant_for_every_preset(preset, build, one_thread):
    fake, packed, loop = _frozen_pair(preset, build)
    # every quantized layer keeps a .weight, now a packed tensor: no float copy of a quantized weight remains
    for n in packed._dmq.modules:
        w = packed.get_submodule(n).weight
        assert isinstance(w, PackedWeight) == bool(packed.get_submodule(n).weight_layouts)
        assert w.shape == fake.get_submodule(n).weight.shape and w.dtype == fake.get_submodule(n).weight.dtype
    with torch.no_grad():
        ref = loop(fake)
        with dmq.kernels.disable("all"):  # the dequantize-on-the-fly reference: bit for bit
            exact = loop(packed)
        fast = loop(packed)
    assert all(torch.equal(r, o) for r, o in zip(ref, exact))
    paths = {packed.get_submodule(n).exec_path for n in packed._dmq.modules}
    if preset in ("w8a8", "w4a8", "w6a6"):
        assert "int_gemm" in paths
    # integer GEMM: exact integer sums, so per layer it differs from the float fake-quant path only by float32
    # roundings (each layer on the inputs it sees, below; the bound per kernel is in test_kernels.py). Through the
    # network a rounding can move a downstream activation across a code boundary, one quantization step: the two
    # models then differ by far less than the quantization itself, never by more
    for r, o in zip(ref, fast):
        assert (r - o).abs().max() <= 1e-4 * r.abs().max() or preset in ("w8a8", "w4a8", "w6a6")
    with torch.no_grad():
        fp = loop(build())  # the float model (the builders are seeded)
    for r, o, f in zip(ref, fast, fp):
        assert (r - o).pow(2).mean() <= 0.25 * (r - f).pow(2).mean()
    worst = _layer_deviation(packed, loop)
    assert worst <= 1e-6, worst


def test_w4_weight_bytes_below_bound():
    # W4 weight-only, groups of 32 with float16 scales: 4 bits + 16/32 bits = 0.5625 bytes per parameter, i.e. 0.28x
    # FP16 (the bound is 0.3x); per-channel W4: 0.5 byte plus one float32 scale per row
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    q = dmq.freeze(dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=()), inplace=False))
    rep = dmq.weight_bytes(q)
    assert rep["quantized_params"] == 2 * 256 * 512
    assert rep["bytes_per_param"] <= 0.5625 + 1e-9
    assert rep["bytes_per_param"] / 2.0 <= 0.3
    assert rep["total_bytes"] == rep["quantized_bytes"] + (512 + 256) * 4  # plus the float32 biases
    q8 = dmq.freeze(dmq.quantize(model, dmq.get_config("w4a8-fp").replace(keep_fp=()), inplace=False))
    assert dmq.weight_bytes(q8)["bytes_per_param"] <= 0.5 + 4 * (512 + 256) / (2 * 256 * 512)


def test_restore_after_packing_is_refused_unless_dequantized_weights_are_asked_for(caplog):
    model = tiny_unet()
    loop = backbone_loop(model, [500])
    q = dmq.freeze(dmq.quantize(model, "w4a16", inplace=False))
    with torch.no_grad():
        expect = loop(q)
    with pytest.raises(ValueError, match="allow_dequantized=True"):
        dmq.restore(q)
    assert hasattr(q, "_dmq")  # nothing was touched
    with caplog.at_level("WARNING"):
        dmq.restore(q, allow_dequantized=True)
    assert "dequantized" in caplog.text and not hasattr(q, "_dmq")
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in q.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():  # the float model now computes with the quantized weights (w4a16: weight-only)
        assert all(torch.equal(a, b) for a, b in zip(expect, loop(q)))


def test_dtype_casts_of_a_packed_model_raise_before_changing_anything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    q = dmq.freeze(dmq.quantize(model, dmq.get_config("fp8").replace(keep_fp=("1",), act=None, attn=None)))
    lin = q[0]
    before = {n: t.clone() for n, t in lin.weight.tensors().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        with pytest.raises(ValueError, match="cannot be cast"):
            cast(q)
    assert lin.bias.dtype == torch.float32 and isinstance(lin.weight, PackedWeight)
    for n, t in lin.weight.tensors().items():
        assert t.dtype == before[n].dtype and torch.equal(t.view(torch.uint8), before[n].view(torch.uint8))
    q.to("cpu")  # moves are fine
    assert isinstance(lin.weight, PackedWeight)
    # a cast of the bare weight is a new float tensor: the dequantized weight in that dtype
    assert torch.equal(lin.weight.to(torch.bfloat16), lin.weight.dequantize(torch.bfloat16))


def test_activation_only_config_packs_nothing_and_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    cfg = dmq.QuantConfig(weight=None, act=QuantSpec("int8", "token", dynamic=True), keep_fp=())
    fake = dmq.freeze(dmq.quantize(model, cfg, inplace=False), pack=False)
    q = dmq.freeze(dmq.quantize(model, cfg, inplace=False))
    assert q[0].weight_layouts == () and isinstance(q[0].weight, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(fake(x), q(x))


def test_int_codes_sign_extend():
    from dmq.packed import int_codes

    w = torch.randn(3, 40)
    for bits in (2, 3, 4, 5, 6, 7, 8):
        spec = QuantSpec(f"int{bits}", "channel")
        tensors, lay = pack_weight(w, spec)
        codes = int_codes(tensors, lay)
        expect = (unpack_weight(tensors, lay) / tensors["weight_scale"].float()).round()
        assert codes.dtype == torch.int8 and torch.equal(codes.float(), expect)
        assert int(codes.min()) >= formats.get(f"int{bits}").qmin
