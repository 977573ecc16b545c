import pytest

import dmq
from dmq.config import QuantConfig, QuantSpec


def test_every_preset_builds_and_documents_itself():
    for name in dmq.preset_names():
        cfg = dmq.get_config(name)
        assert cfg.name == name
        doc = dmq.PRESETS[name].__doc__
        assert doc and len(doc) > 80


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="w8a8.*nvfp4"):
        dmq.get_config("w3a3")


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match="int8"):
        QuantSpec("int9")


@pytest.mark.parametrize("kwargs, match", [
    ({"format": "int8", "granularity": "rows"}, "granularity"),
    ({"format": "int8", "estimator": "magic"}, "estimator"),
    ({"format": "e4m3", "symmetric": False}, "asymmetric"),
    ({"format": "int8", "estimator": "fp_bias"}, "fp_bias"),
    ({"format": "mxfp4", "granularity": "tensor"}, "block"),
])
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_bad_config():
    with pytest.raises(ValueError, match="at least one"):
        QuantConfig(weight=None)
    with pytest.raises(ValueError, match="dynamic"):
        QuantConfig(weight=None, act=QuantSpec("int8", "token"))
    with pytest.raises(ValueError, match="per tensor"):
        QuantConfig(weight=None, act=QuantSpec("int8", "group"))
    with pytest.raises(ValueError, match="statically"):
        QuantConfig(weight=QuantSpec("int8", dynamic=True))
