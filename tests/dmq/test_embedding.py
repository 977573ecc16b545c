"""Quantized embedding tables (``dmq.embedding.QuantEmbedding``): exact row gathers, error bounds, and the whole life
cycle (quantize / calibrate / freeze, save / load, the diffusers backend, dequantize, torch.compile)."""

from pathlib import Path

import pytest
import torch
from torch import nn

import dmq
from dmq import packed, structure
from dmq.config import TABLE_SPEC
from dmq.embedding import QuantEmbedding
from dmq.packed import gather_rows, pack_weight, unpack_weight
from dmq.packed_weight import PackedWeight
from tests.dmq.helpers import backbone_loop, tiny_dit

ROOT = Path(__file__).resolve().parents[2]

SPECS = [
    dmq.QuantSpec("int4", "group", group_size=16, estimator="mse"),
    dmq.QuantSpec("int4", "group", group_size=16, symmetric=False),  # zero points
    dmq.QuantSpec("int8", "channel"),
    dmq.QuantSpec("int8", "tensor"),
    dmq.QuantSpec("e4m3", "channel"),
    dmq.QuantSpec("int6", "group", group_size=8),  # 6-bit packing
    dmq.QuantSpec("nvfp4", "block"),
    dmq.QuantSpec("mxfp4", "block"),
]


def _table(rows=11, dim=40, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=g) * torch.linspace(0.1, 3, rows)[:, None]).to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{int(s.symmetric)}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gathered_rows_are_the_dequantized_table_rows_bit_for_bit(spec, dtype):
    w = _table(dtype=dtype)  # 40 columns: group / block padding of the last group
    tensors, layout = pack_weight(w, spec)
    full = unpack_weight(tensors, layout)
    idx = torch.tensor([[3, 0, 10], [3, 3, 7]])  # repeats, any shape
    got = gather_rows(tensors, layout, idx)
    assert got.dtype == dtype and got.shape == (2, 3, 40)
    assert torch.equal(got, full[idx])
    one = gather_rows(tensors, layout, torch.tensor([5]))  # a single row: a one-row scale slice
    assert torch.equal(one, full[5:6])


def test_a_lookup_dequantizes_only_the_selected_rows(monkeypatch):
    emb = nn.Embedding(1000, 64)
    model = nn.Sequential(emb)
    dmq.quantize(model, dmq.QuantConfig(weight=dmq.QuantSpec("int4", "group", group_size=32), keep_fp=()))
    dmq.freeze(model)
    seen = []
    orig = packed._dequant_rows

    def spy(tensors, layout, r0, r1):
        seen.append((tensors["qweight"].shape[0], r1 - r0))
        return orig(tensors, layout, r0, r1)

    monkeypatch.setattr(packed, "_dequant_rows", spy)
    monkeypatch.setattr(packed, "unpack_weight", lambda *a, **k: pytest.fail("the whole table was dequantized"))
    out = model(torch.tensor([[1, 999]]))
    assert out.shape == (1, 2, 64) and seen == [(2, 2)]


def test_int4_table_error_is_within_half_a_step_of_each_group():
    w = _table(rows=32, dim=64, dtype=torch.float32, seed=3)
    spec = dmq.QuantSpec("int4", "group", group_size=16)  # min-max: step = max|w| / 7 per group of 16
    tensors, layout = pack_weight(w, spec)
    q = gather_rows(tensors, layout, torch.arange(32))
    amax = w.reshape(32, 4, 16).abs().amax(-1, keepdim=True)
    step = tensors["weight_scale"].float().unsqueeze(-1)  # amax / 7 rounded to float16 (two-byte group scales)
    assert torch.allclose(step, amax / 7, rtol=2.0 ** -11, atol=0)
    err = (q - w).reshape(32, 4, 16).abs()
    # half a step inside the grid; the group maximum, if float16 rounded the scale down, is clipped by amax - 7 step
    assert (err <= torch.maximum(step / 2, amax - 7 * step) * (1 + 1e-6)).all()
    assert layout.padded_cols == 64 and tensors["qweight"].numel() == 32 * 64 // 2  # 4-bit codes, two per byte


def _toy(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(10, 48), "lin": nn.Linear(48, 8)}).to(dtype)


def _run(m, idx):
    return m["lin"](m["emb"](idx))


@pytest.mark.parametrize("preset, table", [("w4a16", "auto"), ("nvfp4", dmq.QuantSpec("nvfp4", "block")),
                                           ("w8a8", dmq.QuantSpec("int8", "channel"))])
def test_life_cycle_quantize_calibrate_freeze_save_load(preset, table, tmp_path):
    model = _toy()
    float_table = model["emb"].weight.detach().clone()
    idx = torch.tensor([[0, 9, 4], [4, 4, 1]])
    cfg = dmq.get_config(preset).replace(keep_fp=(), rounding="rtn", per_sample_rounding="rtn", embedding=table)
    dmq.quantize(model, cfg)
    q = model["emb"]
    assert isinstance(q, QuantEmbedding) and isinstance(q, nn.Embedding) and q.weight_spec == cfg.embedding_spec
    with torch.no_grad():
        dmq.calibrate(model, lambda m: _run(m, idx))
        fq = model["emb"](idx)  # the held quantized table, before freeze
    dmq.freeze(model)
    assert isinstance(q.weight, PackedWeight) and q.weight.dtype == torch.bfloat16
    with torch.no_grad():  # packed lookups = the held table's rows = the rows of the dequantized table
        assert torch.equal(q(idx), fq) and torch.equal(q(idx), q.weight.dequantize()[idx])
    assert not torch.equal(fq, float_table[idx])  # it was quantized
    path = tmp_path / "m.safetensors"
    dmq.save(model, path)
    assert dmq.quantization_map(model)["modules"]["emb"]["type"] == "QuantEmbedding"
    loaded = dmq.load(_toy(), path)
    assert isinstance(loaded["emb"], QuantEmbedding)
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t) and loaded.state_dict()[k].dtype == t.dtype, k
    with torch.no_grad():
        assert torch.equal(_run(loaded, idx), _run(model, idx))
    # a damaged table fails loudly and names the tensor
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["emb.qweight"] = tensors["emb.qweight"].clone()
    tensors["emb.qweight"].view(-1)[0] ^= 1
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="emb.qweight"):
        dmq.load(_toy(), tmp_path / "bad.safetensors")


def test_dequantize_gives_a_float_embedding_with_the_quantized_table():
    model = _toy()
    dmq.quantize(model, dmq.get_config("w4a16+rtn").replace(keep_fp=()))
    dmq.freeze(model)
    table = model["emb"].weight.dequantize()
    dmq.dequantize(model, allow_dequantized=True)
    assert type(model["emb"]) is nn.Embedding and torch.equal(model["emb"].weight, table)


def test_compiles_fullgraph_and_matches_eager(one_thread):
    model = _toy()
    dmq.quantize(model, dmq.get_config("nvfp4+rtn").replace(keep_fp=()))
    dmq.freeze(model)
    idx = torch.tensor([2, 7, 7])
    torch._dynamo.reset()
    compiled = torch.compile(model["emb"], fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(idx), model["emb"](idx))


def test_fused_delta_is_added_to_the_looked_up_rows():
    model = _toy(torch.float32)
    dmq.quantize(model, dmq.get_config("w4a16+rtn").replace(keep_fp=()))
    dmq.freeze(model)
    emb, idx = model["emb"], torch.tensor([1, 3])
    base = emb(idx)
    delta = torch.randn(10, 48)
    emb.weight.data += delta  # peft's merge of an embedding adapter
    assert torch.equal(emb(idx), base + delta[idx])
    emb.weight.data -= delta
    assert torch.equal(emb(idx), base)


def test_dit_class_tables_quantized_by_default_and_the_keep_list_holds():
    model = tiny_dit()
    tables = list(structure.tables(model))
    assert tables == ["transformer_blocks.0.norm1.emb.class_embedder.embedding_table"]
    for preset in ("w4a16", "w4a8", "nvfp4", "mxfp4", "w8a8"):  # W4: INT8 tables; W8: 16-bit tables (measured)
        q = dmq.quantize(model, preset, inplace=False)
        t = q.get_submodule(tables[0])
        if preset == "w8a8":
            assert type(t) is nn.Embedding and dmq.get_config(preset).embedding_spec is None
        else:
            assert isinstance(t, QuantEmbedding) and t.weight_spec == TABLE_SPEC, preset
        assert type(q.pos_embed.proj) is nn.Conv2d and type(q.proj_out_2) is nn.Linear  # first / last stay
    # the bundled U-Net's class table sits with its embedders, kept in 16 bits while they are under 2% of the model
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(ROOT / "assets" / "digits-unet" / "unet")
    kept = structure.expand_patterns(unet, dmq.get_config("w4a16").keep_fp,
                                     {**structure.classify(unet), **structure.tables(unet)})
    assert set(kept) == {"conv_in", "conv_out", "class_embedding", "time_embedding.linear_1",
                         "time_embedding.linear_2"}


def test_backend_quantizes_tables_on_load_and_round_trips(tmp_path):
    model = tiny_dit()
    model.save_pretrained(tmp_path / "fp")
    cls = type(model)
    q = cls.from_pretrained(tmp_path / "fp", quantization_config=dmq.DmqConfig("w4a16"), torch_dtype=torch.bfloat16)
    name = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table"
    t = q.get_submodule(name)
    assert isinstance(t, QuantEmbedding) and isinstance(t.weight, PackedWeight) and t.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, ts, labels = torch.randn(2, 1, 8, 8, generator=g).bfloat16(), torch.tensor([10.0, 700.0]), torch.tensor([3, 9])
    with torch.no_grad():
        ref = q(x, ts, class_labels=labels).sample
    q.save_pretrained(tmp_path / "q")
    back = cls.from_pretrained(tmp_path / "q")
    assert isinstance(back.get_submodule(name), QuantEmbedding)
    assert torch.equal(back.get_submodule(name).weight.dequantize(), t.weight.dequantize())
    with torch.no_grad():
        assert torch.equal(back(x, ts, class_labels=labels).sample, ref)
    back.dequantize()
    assert type(back.get_submodule(name)) is nn.Embedding


def test_a_calibrated_dit_keeps_its_table_through_gptq_and_the_budget():
    model = tiny_dit()
    loop = backbone_loop(model, [900, 100])
    cfg = dmq.get_config("w4a16").replace(memory_budget="9bits")  # GPTQ and the budget allocator
    dmq.calibrate(dmq.quantize(model, cfg), loop)
    dmq.freeze(model)
    t = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert isinstance(t.weight, PackedWeight) and t.weight_spec == cfg.embedding_spec
    report = dmq.summary(model)["methods"]["budget"]
    # the table counts at its packed size in the plan (group padding and code bytes included): plan = result
    assert dmq.weight_bytes(model)["total_bytes"] == report["planned_bytes"] <= report["budget_bytes"]


def test_bad_embedding_specs_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"embedding must be 'auto', a QuantSpec or None, got 'int8'"):
        dmq.get_config("w4a16").replace(embedding="int8")
    with pytest.raises(ValueError, match=r"embedding is a weight spec: static.*dynamic=True"):
        dmq.get_config("w4a16").replace(embedding=dmq.QuantSpec("int8", "token", dynamic=True))
    with pytest.raises(ValueError, match="granularity 'tensor', 'channel', 'group' or 'block'"):
        QuantEmbedding.from_float(nn.Embedding(4, 8), dmq.QuantSpec("int8", "tensor", dynamic=True))
    # max_norm renormalises rows in place at each lookup: such a table stays in full precision
    model = nn.ModuleDict({"emb": nn.Embedding(4, 8, max_norm=1.0), "lin": nn.Linear(8, 8)})
    dmq.quantize(model, dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), keep_fp=()))
    assert type(model["emb"]) is nn.Embedding
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(4, 8, max_norm=1.0), dmq.QuantSpec("int8", "channel"))
    # tables can be kept by name, or all of them with embedding=None
    m2 = dmq.quantize(_toy(), dmq.get_config("w4a16").replace(keep_fp=(), embedding=None), inplace=False)
    assert type(m2["emb"]) is nn.Embedding


def test_embedding_field_round_trips_through_json():
    from dmq.config import config_from_json, config_to_json

    spec = dmq.QuantSpec("int8", "group", group_size=64)
    for cfg in (dmq.get_config("nvfp4").replace(embedding=spec), dmq.get_config("w8a8").replace(embedding=None)):
        assert config_from_json(config_to_json(cfg)) == cfg
    assert dmq.get_config("nvfp4").replace(embedding=spec).embedding_spec == spec
    assert TABLE_SPEC == dmq.QuantSpec("int8", "group", group_size=32, estimator="mse")
    assert dmq.get_config("fp8").embedding_spec is None and dmq.get_config("mxfp4").embedding_spec == TABLE_SPEC
