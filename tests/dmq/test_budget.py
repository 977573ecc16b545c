import re

import pytest
import torch

import dmq
from dmq import budget
from dmq.packed import weight_bytes
from tests.dmq import tiny_backbones as tb

CAL = [tb.inputs("flux", 2, seed=i) for i in range(3)]
EVAL = [tb.inputs("flux", 2, seed=100 + i) for i in range(2)]


def _run(cfg):
    model = tb.build("flux")
    with torch.no_grad():
        ref = [tb.output(model, kw) for kw in EVAL]
    q = dmq.quantize(model, cfg, inplace=False)
    dmq.calibrate(q, lambda m: [tb.output(m, kw) for kw in CAL])
    dmq.freeze(q)
    with torch.no_grad():
        out = [tb.output(q, kw) for kw in EVAL]
    err = sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref)) / sum(float(r.pow(2).sum()) for r in ref)
    return model, q, -10 * torch.log10(torch.tensor(err)).item()


def test_budget_units():
    assert budget.budget_bytes(4.5, 1000) == 4.5 * 1000 / 8
    assert budget.budget_bytes("4.5bits", 1000) == budget.budget_bytes("4.5 bpp", 1000) == 562.5
    assert budget.budget_bytes("7GB", 1) == 7e9 and budget.budget_bytes("512MiB", 1) == 512 * 2 ** 20
    assert budget.budget_bytes(3e6, 1) == 3e6  # above 32: bytes
    with pytest.raises(ValueError, match="'7 parsecs'"):
        dmq.get_config("w4a16").replace(memory_budget="7 parsecs")
    with pytest.raises(ValueError, match="positive"):
        dmq.get_config("w4a16").replace(memory_budget=-1)
    with pytest.raises(TypeError, match="memory_budget"):
        dmq.get_config("w4a16").replace(memory_budget=[4])


def test_budget_is_met_and_buys_accuracy():
    base = dmq.get_config("w4a16").replace(rounding="rtn", per_sample_rounding="rtn")
    model, q4, sqnr4 = _run(base)
    numel = budget.model_numel(model)
    target = budget.budget_bytes(7.0, numel)  # whole model at 7 bits per parameter
    _, qb, sqnrb = _run(base.replace(memory_budget=7.0))
    total = weight_bytes(qb)["total_bytes"]
    assert total <= target
    assert weight_bytes(q4)["total_bytes"] < total  # the budget was used ...
    assert sqnrb > sqnr4 + 3.0  # ... for accuracy
    rep = dmq.summary(qb)["methods"]["budget"]
    assert rep["planned_bytes"] <= rep["budget_bytes"] == target
    # the allocation round-trips through the learned config
    assert dmq.learned_config(qb).overrides


def test_unreachable_budget_names_the_smallest_size():
    model = tb.build("flux")
    cfg = dmq.get_config("w4a16").replace(memory_budget=3.0)
    with pytest.raises(ValueError, match="smallest reachable size") as e:
        dmq.quantize(model, cfg, inplace=False)
    low_mib = float(re.search(r"size of this model: ([0-9.]+) MiB", str(e.value)).group(1))
    # the cheapest allocation (every layer int4 group-wise) really has about that size once packed
    _, q, _ = _run(dmq.get_config("w4a16").replace(rounding="rtn", per_sample_rounding="rtn"))
    actual = weight_bytes(q)["total_bytes"] / 2 ** 20
    assert actual <= low_mib + 0.01 and actual > 0.9 * low_mib
    assert type(model.x_embedder) is torch.nn.Linear  # the user's model is untouched
