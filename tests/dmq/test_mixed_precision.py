import itertools

import pytest
import torch

import dmq
from dmq.config import QuantSpec
from dmq.mixed_precision import (
    MixedPrecisionPlan,
    allocate,
    average_bits_budget,
    measure_sensitivity,
    pareto_allocate,
    spec_bits,
)
from tests.dmq.helpers import backbone_loop, tiny_unet


def test_pareto_allocation_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    layers = [f"l{i}" for i in range(6)]
    opts = {"int2": 2, "int4": 4, "int8": 8}
    size = {n: int(s) for n, s in zip(layers, torch.randint(10, 100, (6,), generator=g))}
    costs = {n: {k: size[n] * b for k, b in opts.items()} for n in layers}
    errors = {n: {"int2": float(e) * 16, "int4": float(e) * 4, "int8": float(e) * 0.1}
              for n, e in zip(layers, torch.rand(6, generator=g))}
    total = sum(size.values())
    for avg in (2.0, 3.0, 4.5, 6.0, 8.0):
        budget = avg * total
        choice, cost, err, front = pareto_allocate(costs, errors, budget)
        best = min((sum(errors[n][k] for n, k in zip(layers, combo)), combo)
                   for combo in itertools.product(opts, repeat=6)
                   if sum(costs[n][k] for n, k in zip(layers, combo)) <= budget)
        assert cost <= budget
        assert cost == sum(costs[n][choice[n]] for n in layers)
        assert err == pytest.approx(best[0])
        assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))  # a strict Pareto front
    with pytest.raises(ValueError, match="below the cheapest"):
        pareto_allocate(costs, errors, 1.0 * total)


def test_sensitivity_allocation_budget_and_json_round_trip(one_thread):
    model = tiny_unet()
    q = dmq.quantize(model, dmq.get_config("w4a16").replace(keep_fp=("conv_in", "conv_out", "*time_emb*")),
                     inplace=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3, 8])

    def forward_fn(m):
        return [m(x, torch.tensor([800.0, 200.0]), class_labels=y).sample]

    before = {n: q.get_submodule(n).weight_fq.clone() for n in q._dmq.modules}
    cands = [QuantSpec("int2", "channel"), QuantSpec("int4", "channel"), QuantSpec("int8", "channel")]
    sens = measure_sensitivity(q, forward_fn, cands)
    assert all(torch.equal(before[n], q.get_submodule(n).weight_fq) for n in before)  # model left as it was
    assert sum(s["int2"] for s in sens.values()) > sum(s["int4"] for s in sens.values()) > sum(
        s["int8"] for s in sens.values()) > 0
    budget = average_bits_budget(q, list(sens), 4.0)
    plan = allocate(q, sens, cands, budget)
    cost = sum(q.get_submodule(n).weight.numel() * spec_bits(s) for n, s in plan.specs.items())
    assert cost == plan.cost_bits <= budget
    back = MixedPrecisionPlan.from_json(plan.to_json())
    assert back.specs == plan.specs and back.cost_bits == plan.cost_bits
    cfg = back.to_config(dmq.get_config("w4a16"))
    assert dmq.config_from_json(dmq.config_to_json(cfg)) == cfg
    fresh = dmq.quantize(tiny_unet(), cfg)
    for n, s in plan.specs.items():
        assert fresh.get_submodule(n).weight_spec == s
    # a calibration loop still runs on the mixed model
    dmq.freeze(dmq.calibrate(fresh, backbone_loop(fresh, [500])))
