"""Learned artefacts (rounding, smoothing scales, rotations, low-rank factors, searched formats) live in the
model's state: state_dict -> freshly quantized model -> load_state_dict reproduces the outputs exactly."""

import copy

import pytest
import torch

import dmq
from dmq.rounding import target_weight, weight_grid
from tests.dmq.helpers import backbone_loop, tiny_dit, tiny_unet


def _outputs(model):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([2, 9])
    with torch.no_grad():
        return torch.cat([model(x, torch.full((2,), float(t)), class_labels=y).sample for t in (950.0, 420.0, 30.0)])


def _mark_loaded(model):
    # Loading fixes the static activation scales; marking them frozen is what dmq's loader does with them.
    for q in dmq.quantizers(model).values():
        q.observer, q.frozen = None, True
    model._dmq.frozen = True


@pytest.mark.parametrize("make, name", [
    (tiny_dit, "w4a8+adaround+smooth+svd4+hadamard"),
    (tiny_unet, "w4a8+gptq+smooth0.5"),
    (tiny_dit, "w4a6-fp+fsearch+adaround"),
    (tiny_dit, "w4a8+brecq+svd2"),
    (tiny_unet, "nvfp4+svd8+gptq"),
])
def test_learned_artefacts_survive_a_state_dict_round_trip(make, name, one_thread):
    fp = make()
    cfg = dmq.get_config(name).replace(rounding_iters=150 if "brecq" in name else 20)
    q = dmq.quantize(fp, cfg, inplace=False)
    dmq.freeze(dmq.calibrate(q, backbone_loop(fp, [900, 300, 20])), pack=False)  # the fake-quant state dict
    ref = _outputs(q)
    # the learned weights are not what round-to-nearest gives: a reload must not recompute them
    if cfg.rounding != "rtn":
        changed = 0
        for n in q._dmq.modules:
            m = q.get_submodule(n)
            w = target_weight(m).reshape(m.weight.shape)
            rtn = weight_grid(w, m.weight_spec, getattr(m, "split", None)).nearest(w.reshape(w.shape[0], -1))
            changed += int(not torch.equal(rtn.reshape(w.shape), m.weight_fq))
        assert changed > 0
    state = copy.deepcopy(q.state_dict())
    fresh = dmq.quantize(make(), dmq.learned_config(q))
    fresh.load_state_dict(state)
    _mark_loaded(fresh)
    assert torch.equal(_outputs(fresh), ref)
    keys = set(state)
    if cfg.lowrank:
        assert any(k.endswith("lowrank_up") for k in keys) and any(k.endswith("lowrank_down") for k in keys)
    if cfg.rotation:
        assert any(k.endswith(".rotation") for k in keys)
    assert any(k.endswith("weight_fq") for k in keys)
