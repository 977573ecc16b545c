"""dmq.save / dmq.load: bit-exact round trips, per-module maps, carried extra buffers, loud failures on bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dmq
from tests.dmq.helpers import backbone_loop, tiny_dit, tiny_unet


def _frozen(preset, build=tiny_dit):
    model = build()
    loop = backbone_loop(model, [900, 100])
    return dmq.freeze(dmq.calibrate(dmq.quantize(model, preset), loop)), loop


def _outs(model, loop):
    with torch.no_grad():
        return loop(model)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16", "fp8", "nvfp4", "mxfp4", "w4a6-fp"])
def test_save_load_round_trip_is_bit_exact(preset, tmp_path, one_thread):
    q, loop = _frozen(preset)
    ref = _outs(q, loop)
    path = tmp_path / "m.safetensors"
    dmq.save(q, path)
    rebuilt = dmq.load(path)  # from the diffusers config in the map: no float weights needed
    assert type(rebuilt) is type(q) and rebuilt._dmq.modules == q._dmq.modules
    assert all(torch.equal(a, b) for a, b in zip(ref, _outs(rebuilt, loop)))
    into = dmq.load(tiny_dit(seed=7), path)  # other random weights: all replaced
    assert all(torch.equal(a, b) for a, b in zip(ref, _outs(into, loop)))


def test_unet_with_shortcut_splits_round_trips(tmp_path, one_thread):
    q, loop = _frozen("w8a8", tiny_unet)
    assert q._dmq.splits
    path = tmp_path / "u.safetensors"
    dmq.save(q, path)
    r = dmq.load(path)
    assert r._dmq.splits == q._dmq.splits and r._dmq.hook is not None  # 4 timestep bins need the hook
    assert all(torch.equal(a, b) for a, b in zip(_outs(q, loop), _outs(r, loop)))


def test_map_is_written_per_module_and_extra_buffers_are_carried(tmp_path):
    # mixed precision: one layer with its own spec; tensors another tool registers as buffers, unknown to dmq
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(5, 32)
    q = dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=()))
    q[2] = dmq.QuantLinear.from_float(nn.Linear(64, 16), dmq.get_config("w8a8").replace(
        act=None, attn=None, keep_fp=()))
    q[2].register_buffer("tool_vector", torch.randn(64))
    q[0].register_buffer("tool_scale", torch.randn(3))
    dmq.freeze(q)
    path = tmp_path / "mixed.safetensors"
    dmq.save(q, path)
    qmap = dmq.quantization_map(q)
    assert qmap["modules"]["0"]["layouts"][0]["format"] == "int4"
    assert qmap["modules"]["0"]["layouts"][0]["granularity"] == "group"
    assert qmap["modules"]["2"]["weight_spec"]["format"] == "int8"
    assert qmap["modules"]["2"]["layouts"][0]["storage"] == "int8"
    with pytest.raises(ValueError, match="rebuilt from its config"):
        dmq.load(path)  # a plain nn.Sequential cannot be rebuilt from a config
    r = dmq.load(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)), path)
    assert torch.equal(r[2].tool_vector, q[2].tool_vector)
    assert torch.equal(r[0].tool_scale, q[0].tool_scale)
    assert r[2].weight_layouts[0].format == "int8" and r[0].weight_layouts[0].format == "int4"
    with torch.no_grad():
        assert torch.equal(r(x), q(x))


def test_save_needs_a_packed_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        dmq.save(tiny_dit(), tmp_path / "a.safetensors")
    q = dmq.freeze(dmq.quantize(tiny_dit(), "w4a16"), pack=False)
    with pytest.raises(ValueError, match="packed"):
        dmq.save(q, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="unquantized"):
        dmq.load(dmq.quantize(tiny_dit(), "w4a16"), tmp_path / "a.safetensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q, _ = _frozen("w4a8")
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    dmq.save(q, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return path, json.loads(meta["dmq"]), tensors


def _rewrite(path, qmap, tensors, fix_digests=True, seal_of=None):
    """Write ``qmap`` and ``tensors`` as a checkpoint, resealed (``fix_digests``) or with the seal of ``seal_of``."""
    from dmq import integrity

    if fix_digests:
        from dmq.serialization import _digest

        qmap = {**qmap, "sha256": {k: _digest(v) for k, v in tensors.items()}}
    meta = {"format": "pt", "dmq": json.dumps(qmap)}
    if fix_digests:
        meta = integrity.seal(meta, tensors)
    else:
        with safe_open(str(seal_of), "pt") as f:
            meta[integrity.SEAL_KEY] = f.metadata()[integrity.SEAL_KEY]
    save_file(tensors, str(path), metadata=meta)
    return path


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dmq.load(bad)


def test_flipped_byte_names_the_tensor(saved, tmp_path):
    path, qmap, tensors = saved
    key = next(k for k in tensors if k.endswith("ff.net.0.proj.qweight"))
    t = dict(tensors)
    t[key] = t[key].clone()
    t[key][0, 0] ^= 1
    with pytest.raises(ValueError, match=f"tensor '{key}' does not match its sha256"):
        dmq.load(_rewrite(tmp_path / "flip.safetensors", qmap, t, fix_digests=False, seal_of=path))


def test_wrong_shape_names_the_tensor(saved, tmp_path):
    path, qmap, tensors = saved
    key = next(k for k in tensors if k.endswith("attn1.to_q.qweight"))
    t = dict(tensors)
    t[key] = t[key][:, :-1].contiguous()
    with pytest.raises(ValueError, match=f"tensor '{key}' is torch.uint8"):
        dmq.load(_rewrite(tmp_path / "shape.safetensors", qmap, t))
    key = next(k for k in tensors if k.endswith("proj_out_2.weight"))  # the last layer stays a float tensor
    t = dict(tensors)
    t[key] = t[key][:-1].contiguous()
    with pytest.raises(ValueError, match=f"tensor '{key}' has shape"):
        dmq.load(_rewrite(tmp_path / "shape2.safetensors", qmap, t))


def test_wrong_format_name_and_missing_or_unknown_keys(saved, tmp_path):
    path, qmap, tensors = saved
    name = next(iter(qmap["modules"]))
    bad = json.loads(json.dumps(qmap))
    bad["modules"][name]["layouts"][0]["format"] = "int44"
    with pytest.raises(ValueError, match=f"module '{name}'.*unknown format 'int44'"):
        dmq.load(_rewrite(tmp_path / "fmt.safetensors", bad, tensors))
    t = dict(tensors)
    dropped = next(k for k in t if k.endswith("weight_scale"))
    del t[dropped]
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        dmq.load(_rewrite(tmp_path / "missing.safetensors", qmap, t))
    t = {**tensors, "pos_embed.surprise": torch.zeros(2)}
    with pytest.raises(ValueError, match="'pos_embed.surprise' belongs to no module"):
        dmq.load(_rewrite(tmp_path / "extra.safetensors", qmap, t))
    bad = json.loads(json.dumps(qmap))
    bad["model"]["class"] = "os:system"
    with pytest.raises(ValueError, match="not in an allowed package"):
        dmq.load(_rewrite(tmp_path / "cls.safetensors", bad, tensors))
    with pytest.raises(ValueError, match="does-not-exist.safetensors' does not exist"):
        dmq.load(tmp_path / "does-not-exist.safetensors")


@pytest.mark.parametrize("make, name", [
    (tiny_dit, "w4a8+adaround+smooth+svd4+hadamard"),
    (tiny_unet, "nvfp4+svd8+gptq"),
    (tiny_dit, "w4a6-fp+fsearch+adaround"),
])
def test_learned_methods_pack_exactly_and_round_trip(make, name, tmp_path, one_thread):
    # learned rounding, smoothing, rotation, low-rank branches and searched formats: the packed model computes the
    # fake-quant model's output, and dmq.save / dmq.load carry every artefact without knowing it
    import copy

    fp = make()
    loop = backbone_loop(fp, [900, 300, 20])
    q = dmq.calibrate(dmq.quantize(fp, dmq.get_config(name).replace(rounding_iters=20), inplace=False), loop)
    fake = dmq.freeze(copy.deepcopy(q), pack=False)
    packed = dmq.freeze(q)
    with dmq.kernels.disable("all"):
        assert all(torch.equal(a, b) for a, b in zip(_outs(fake, loop), _outs(packed, loop)))
    ref = _outs(packed, loop)
    dmq.save(packed, tmp_path / "m.safetensors")
    loaded = dmq.load(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ref, _outs(loaded, loop)))
    for n in packed._dmq.modules:
        for buf in ("lowrank_down", "rotation"):
            mine, theirs = getattr(packed.get_submodule(n), buf), getattr(loaded.get_submodule(n), buf)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    if any(t in name for t in ("smooth", "svd", "hadamard")):
        with pytest.raises(ValueError, match="learned transforms"):
            dmq.restore(packed, allow_dequantized=True)


def test_realign_moves_misaligned_plain_tensors_only():
    """A tensor at an 8-byte offset of its storage (as a checkpoint buffer can hand out) gets fresh, 64-byte aligned
    memory with the same values and flags; aligned tensors keep their storage."""
    from dmq.serialization import ALIGNMENT, realign

    lin = nn.Linear(8, 4)
    base = torch.randn(4 * 8 + 2)
    lin.weight = nn.Parameter(base[2:].view(4, 8), requires_grad=False)
    lin.register_buffer("scale", torch.randn(5 + 2)[2:])
    before = lin.weight.detach().clone(), lin.scale.clone()
    bias = lin.bias
    assert lin.weight.data_ptr() % ALIGNMENT and lin.scale.data_ptr() % ALIGNMENT
    assert realign(lin) == 2
    assert lin.weight.data_ptr() % ALIGNMENT == 0 and lin.scale.data_ptr() % ALIGNMENT == 0
    assert torch.equal(lin.weight, before[0]) and torch.equal(lin.scale, before[1])
    assert isinstance(lin.weight, nn.Parameter) and not lin.weight.requires_grad
    assert lin.bias is bias and realign(lin) == 0
