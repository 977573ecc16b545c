import pytest
import torch
from torch import nn

import dmq
from dmq import structure
from dmq.modules import QuantConv2d, QuantLinear
from tests.dmq import tiny_backbones as tb


def _call_order(model: nn.Module, kwargs: dict) -> list[str]:
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in model.named_modules()
             if isinstance(m, structure.LAYER_TYPES)]
    with torch.no_grad():
        tb.output(model, kwargs)
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("family", tb.FAMILIES)
def test_roles_match_the_measured_graph(family):
    model = tb.build(family)
    kw = tb.inputs(family, batch=3)
    roles = structure.classify(model)
    rows = structure.observe_rows(model, lambda m: tb.output(m, kw), batch=3)
    # one-token-per-sample layers are exactly the ones that see one row per sample
    assert {n for n, r in roles.items() if r in structure.PER_SAMPLE} == {n for n, v in rows.items() if v == 1.0}
    # the first layer is the first token layer the forward calls, the last one the last layer it calls
    order = [n for n in _call_order(model, kw) if rows[n] > 1]
    assert [n for n, r in roles.items() if r == "first"] == [order[0]]
    assert [n for n, r in roles.items() if r == "last"] == [order[-1]]
    assert set(roles) == {n for n, m in model.named_modules() if isinstance(m, structure.LAYER_TYPES)}


def test_plain_modules_have_no_first_or_last():
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))
    assert set(structure.classify(model).values()) == {"body"}


def test_default_config_quantizes_per_sample_layers_weight_only_and_keeps_first_last():
    model = tb.build("flux")
    roles = structure.classify(model)
    kept = set(structure.expand_patterns(model, dmq.get_config("w4a8").keep_fp))
    assert {n for n, r in roles.items() if r in ("first", "last")} <= kept
    q = dmq.quantize(model, "w4a8", inplace=False)
    for name, role in roles.items():
        mod = q.get_submodule(name)
        if name in kept:
            assert type(mod) is nn.Linear, name
        elif role in structure.PER_SAMPLE:
            assert isinstance(mod, QuantLinear) and mod.input_quantizer is None, name
            assert (mod.weight_spec.granularity, mod.weight_spec.format) == ("group", "int4"), name
        else:
            assert isinstance(mod, (QuantLinear, QuantConv2d)) and mod.input_quantizer is not None, name
    assert sorted(q._dmq.per_sample) == sorted(n for n, r in roles.items()
                                               if r in structure.PER_SAMPLE and n not in kept)


def test_peer_layout_variants_quantize_per_sample_layers_fully_and_leave_attention_alone():
    model = tb.build("flux")
    roles = structure.classify(model)
    kept = set(structure.expand_patterns(model, dmq.get_config("w8a8").keep_fp))
    assert any(r in structure.PER_SAMPLE and n not in kept for n, r in roles.items())
    q = dmq.quantize(model, "w8a8+sdpa+uniform", inplace=False)
    assert not any(hasattr(m, "matmul_quantizers") for m in q.modules())  # diffusers' own attention processors
    assert any(hasattr(m, "matmul_quantizers") for m in dmq.quantize(model, "w8a8", inplace=False).modules())
    for name, role in roles.items():
        if name not in kept:
            mod = q.get_submodule(name)
            assert isinstance(mod, (QuantLinear, QuantConv2d)) and mod.input_quantizer is not None, name
            assert (mod.weight_spec.granularity, mod.weight_spec.format) == ("channel", "int8"), name
    assert not q._dmq.per_sample


def test_gptq_on_per_sample_layers_lowers_their_error():
    model = tb.build("sd3")
    cal = [tb.inputs("sd3", 2, seed=i) for i in range(4)]
    q = dmq.quantize(model, dmq.get_config("w4a16").replace(rounding="rtn"), inplace=False)
    dmq.calibrate(q, lambda m: [tb.output(m, kw) for kw in cal])
    ratios = dmq.summary(q)["methods"]["error_vs_rtn"]
    assert set(ratios) == set(q._dmq.per_sample)
    assert all(r <= 1.0 + 1e-6 for r in ratios.values()) and min(ratios.values()) < 0.9


def test_role_patterns_expand_and_bad_patterns_are_reported():
    model = tb.build("pixart")
    q = dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=("@first", "@last", "@context")),
                     inplace=False)
    assert type(q.caption_projection.linear_1) is nn.Linear and type(q.proj_out) is nn.Linear
    embedders = [n for n, r in structure.classify(model).items() if r == "embedder"]
    assert embedders and list(structure.expand_patterns(model, ("@embedder<100%",))) == embedders
    assert structure.expand_patterns(model, ("@embedder<0.01%",)) == ()  # over 0.01% of the parameters
    with pytest.warns(UserWarning, match=r"'\*no_such_layer\*'"):
        dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=("@first", "*no_such_layer*")), inplace=False)
    with pytest.raises(ValueError, match="@nonsense"):
        dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=("@nonsense",)), inplace=False)
    with pytest.raises(ValueError, match="per_sample"):
        dmq.get_config("w4a16").replace(per_sample="int4")
    with pytest.raises(ValueError, match="per_sample_rounding"):
        dmq.get_config("w4a16").replace(per_sample_rounding="nearest")


def test_bf16_model_stays_bf16():
    model = tb.build("sd3").to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in tb.inputs("sd3", 2).items()}
    q = dmq.quantize(model, "w4a16+rtn", inplace=False)
    dmq.calibrate(q, lambda m: tb.output(m, kw))
    dmq.freeze(q)
    floats = {n: t.dtype for n, t in list(q.named_parameters()) + list(q.named_buffers())
              if t.is_floating_point() and not n.endswith(("weight_scale", "weight_scale2"))}
    assert set(floats.values()) == {torch.bfloat16}
    assert q.pos_embed.proj.weight.dtype == q.proj_out.bias.dtype == torch.bfloat16


def test_new_fields_round_trip_through_json():
    from dmq.config import config_from_json, config_to_json

    cfg = dmq.get_config("w4a8").replace(per_sample=dmq.QuantSpec("int8", "group", group_size=16),
                                         per_sample_rounding="adaround", memory_budget="6bits",
                                         keep_fp=("@first", "@last", "*norm_out*"))
    assert config_from_json(config_to_json(cfg)) == cfg
    assert cfg.per_sample_spec == dmq.QuantSpec("int8", "group", group_size=16)
    assert dmq.get_config("w8a8").per_sample_spec == dmq.QuantSpec("int8", "group", group_size=32, estimator="mse")
    assert dmq.get_config("nvfp4").per_sample_spec == dmq.get_config("nvfp4").weight
    assert dmq.get_config("w4a16").replace(per_sample=None).per_sample_spec is None


def test_z_image_roles_from_its_config():
    """Z-Image has one patch size per resolution (``all_patch_size``), a Linear patch embedding on the patchified
    latent and a DiT-style ``TimestepEmbedder``: its first, last and embedder layers are found like the others'."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[8, 4, 4],
                                     axes_lens=[64, 16, 16]).eval()
    with torch.no_grad():
        model.x_pad_token.zero_()
        model.cap_pad_token.zero_()
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)]
    caps = [torch.randn(5, 24, generator=g) for _ in range(3)]

    def run(m):
        return m(x, torch.full((3,), 0.4), caps, return_dict=False)

    roles = structure.classify(model)
    rows = structure.observe_rows(model, run, batch=3)
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in model.named_modules()
             if isinstance(m, structure.LAYER_TYPES)]
    with torch.no_grad():
        run(model)
    for h in hooks:
        h.remove()
    tokens = [n for n in order if rows[n] > 1]
    assert [n for n, r in roles.items() if r == "first"] == [tokens[0]] == ["all_x_embedder.2-1"]
    assert [n for n, r in roles.items() if r == "last"] == [tokens[-1]] == ["all_final_layer.2-1.linear"]
    assert {n for n, r in roles.items() if r == "embedder"} == {"t_embedder.mlp.0", "t_embedder.mlp.2"}
    assert all(rows[n] == 1.0 for n, r in roles.items() if r in structure.PER_SAMPLE)
    kept = set(structure.expand_patterns(model, dmq.get_config("w8a8").keep_fp))
    assert {"all_x_embedder.2-1", "all_final_layer.2-1.linear"} <= kept  # (the embedder: only while under 2%)
