import pytest

import dmq
from dmq.calibration import NormalSteps
from dmq.config import QuantSpec, config_from_json, config_to_json
from dmq.embedding import QuantEmbedding


def test_variants_compose_on_presets():
    cfg = dmq.get_config("w4a8+adaround")
    assert (cfg.rounding, cfg.name, cfg.weight) == ("adaround", "w4a8+adaround", dmq.get_config("w4a8").weight)
    cfg = dmq.get_config("nvfp4+svd32")
    assert cfg.lowrank == 32 and cfg.weight.format == "nvfp4"
    cfg = dmq.get_config("w4a8+smooth0.5+gptq+hadamard")
    assert (cfg.smooth, cfg.rounding, cfg.rotation) == (0.5, "gptq", "hadamard")
    assert dmq.get_config("w4a6-fp+smooth+fsearch").smooth == "search"
    assert not dmq.get_config("w4a8+rtn").learns_weights and cfg.learns_weights
    assert dmq.get_config("w8a8").learns_weights  # GPTQ rounding of the one-token-per-sample layers
    cfg = dmq.get_config("w8a8+sdpa+uniform")
    assert (cfg.attn, cfg.attn_probs, cfg.per_sample_spec, cfg.act) == (None, None, None, dmq.get_config("w8a8").act)
    assert not cfg.learns_weights  # nothing left for GPTQ: the per-sample layers round like the rest (RTN)


@pytest.mark.parametrize("name, match", [("w4a8+magic", "valid variants: adaround"), ("w3a3+gptq", "valid presets"),
                                         ("w4a8+smooth1.5", "alpha")])
def test_bad_variants_raise(name, match):
    with pytest.raises(ValueError, match=match):
        dmq.get_config(name)


def test_bad_method_fields_raise():
    base = dmq.get_config("w4a8")
    with pytest.raises(ValueError, match="rounding must be one of"):
        base.replace(rounding="nearest")
    with pytest.raises(ValueError, match="rotation must be"):
        base.replace(rotation="givens")
    with pytest.raises(ValueError, match="act on weights"):
        dmq.QuantConfig(weight=None, act=QuantSpec("int8", "token", dynamic=True), rounding="gptq")
    with pytest.raises(ValueError, match="static"):
        base.replace(overrides=(("*", QuantSpec("int8", "token", dynamic=True)),))


def test_config_json_round_trip_with_overrides_and_policy():
    cfg = dmq.get_config("w4a8+adaround+svd8").replace(
        overrides=(("down_blocks.*", QuantSpec("int8", "channel")), ("*to_q", QuantSpec("e2m1", "channel"))),
        steps=NormalSteps(mu=0.3, sigma=0.2, seed=4), keep_fp=("conv_in",))
    back = config_from_json(config_to_json(cfg))
    assert back == cfg
    assert back.weight_for("down_blocks.0.resnets.0.conv1").format == "int8"
    assert back.weight_for("up_blocks.0.attentions.0.to_q").format == "e2m1"
    assert back.weight_for("mid_block.resnets.0.conv1") == cfg.weight


def test_quantize_applies_per_module_overrides():
    from tests.dmq.helpers import tiny_unet

    cfg = dmq.get_config("w4a8").replace(overrides=(("*attentions*", QuantSpec("int8", "channel")),))
    q = dmq.quantize(tiny_unet(), cfg)
    tables = 0
    for n in q._dmq.modules:
        m = q.get_submodule(n)
        if isinstance(m, QuantEmbedding):  # a lookup table no override names: config.embedding_spec
            assert m.weight_spec == cfg.embedding_spec
            tables += 1
            continue
        expect = "int8" if "attentions" in n else "int4"
        assert m.weight_spec.format == expect
    assert len(q._dmq.modules) - tables > 10
