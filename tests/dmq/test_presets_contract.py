"""Contract test over every preset: per-module SQNR bounds from closed forms, on plain layers and tiny backbones."""

import pytest
import torch
from torch import nn

import dmq
from tests.dmq.helpers import backbone_loop, combine_db, format_sqnr_db, sqnr, tiny_dit, tiny_unet

PRESETS = dmq.preset_names()


def _bound(cfg: dmq.QuantConfig) -> float:
    return combine_db(*[format_sqnr_db(s.format) for s in (cfg.weight, cfg.act) if s is not None])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layer", ["linear", "conv3x3", "conv1x1_groups"])
def test_module_sqnr_bound(preset, layer):
    torch.manual_seed(0)
    if layer == "linear":
        mod, x = nn.Linear(64, 48), torch.randn(16, 64)
    elif layer == "conv3x3":
        mod, x = nn.Conv2d(32, 16, 3, padding=1), torch.randn(2, 32, 6, 6)
    else:
        mod, x = nn.Conv2d(32, 32, 1, groups=2), torch.randn(2, 32, 6, 6)
    model = nn.Sequential(mod)
    with torch.no_grad():
        ref = model(x)
    cfg = dmq.get_config(preset).replace(keep_fp=())
    q = dmq.quantize(model, cfg, inplace=False)
    dmq.freeze(dmq.calibrate(q, lambda m: m(x)))
    with torch.no_grad():
        out = q(x)
    assert sqnr(ref, out) >= _bound(cfg)
    assert sqnr(ref, out) < 80  # something was quantized


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_backbone_runs_and_keeps_signal(preset, build):
    model = build()
    loop = backbone_loop(model, [900, 500, 100])
    with torch.no_grad():
        refs = loop(model)
    q = dmq.quantize(model, preset, inplace=False)
    dmq.freeze(dmq.calibrate(q, loop))
    with torch.inference_mode():
        outs = loop(q)
    # a whole backbone compounds per-layer errors: ask for the per-layer bound less 12 dB, and at least 3 dB
    bound = max(_bound(dmq.get_config(preset)) - 12.0, 3.0)
    for r, o in zip(refs, outs):
        assert torch.isfinite(o).all()
        assert sqnr(r, o) >= bound


def test_w8a8_beats_w4a8_beats_nothing():
    model = tiny_unet()
    loop = backbone_loop(model, [700, 300])
    with torch.no_grad():
        ref = loop(model)
    scores = {}
    for p in ("w8a8", "w4a8"):
        q = dmq.freeze(dmq.calibrate(dmq.quantize(model, p, inplace=False), loop))
        with torch.no_grad():
            scores[p] = min(sqnr(r, o) for r, o in zip(ref, loop(q)))
    assert scores["w8a8"] > scores["w4a8"] + 6
