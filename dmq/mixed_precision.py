"""Sensitivity-driven mixed precision: per-layer weight formats under a memory budget.

Sensitivity (ZeroQ, Cai et al., 2020, eq. 4; BAQ): for every layer ``l`` and candidate weight spec ``b``, the
relative output error ``||f(x) - f_{l,b}(x)||^2 / ||f(x)||^2`` of the model with only layer ``l`` quantized to
``b``, over inputs drawn from every timestep of the trajectory. Assuming the errors add up (ZeroQ's assumption),
the allocation minimising the total error subject to ``sum_l size_l * bits_b <= budget`` is a multiple-choice
knapsack, solved exactly by merging Pareto fronts of (cost, error) layer by layer. The result is a per-module
config (``QuantConfig.overrides``) that :func:`dmq.quantize` accepts and that serialises to JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dmq.config import QuantConfig, QuantSpec, config_from_dict, config_to_dict
from dmq.rounding.layer import requantize_rtn, set_weight_fq, target_weight


def spec_bits(spec: QuantSpec) -> float:
    """Storage bits per weight element (block formats include their shared scales)."""
    fmt = spec.fmt
    return float(fmt.bits_per_element() if hasattr(fmt, "bits_per_element") else fmt.bits)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, forward_fn: Callable[[nn.Module], Sequence[torch.Tensor]],
                        candidates: Sequence[QuantSpec], names: Sequence[str] | None = None
                        ) -> dict[str, dict[str, float]]:
    """``{layer: {format: relative output error}}`` with one layer at a time weight-quantized to each candidate
    (all other weights and every activation in full precision). ``model`` is a quantized model (before
    :func:`dmq.freeze`); ``forward_fn(model)`` returns outputs whose error is measured (e.g. noise predictions at
    inputs captured across timesteps). The model's quantized weights and quantizer states are restored."""
    from dmq.api import _state, quantizers

    st = _state(model)
    names = list(names) if names is not None else list(st.modules)
    mods = {n: model.get_submodule(n) for n in names}
    saved = {n: (m._buffers["weight_fq"], m.weight_spec) for n, m in mods.items()}  # replaced, never written
    qs = list(quantizers(model).values())
    enabled = [q.enabled for q in qs]
    try:
        for q in qs:
            q.enabled = False
        for m in mods.values():
            set_weight_fq(m, target_weight(m))
        ref = [r.detach().double() for r in forward_fn(model)]
        power = sum(float(r.pow(2).sum()) for r in ref)
        out: dict[str, dict[str, float]] = {}
        for n, m in mods.items():
            out[n] = {}
            for spec in candidates:
                m.weight_spec = spec
                requantize_rtn(m)
                err = sum(float((o.double() - r).pow(2).sum()) for o, r in zip(forward_fn(model), ref))
                out[n][spec.format] = err / max(power, 1e-30)
            m.weight_spec = saved[n][1]
            set_weight_fq(m, target_weight(m))
    finally:
        for q, e in zip(qs, enabled):
            q.enabled = e
        for n, m in mods.items():
            m._buffers["weight_fq"] = saved[n][0]
            m.weight_spec = saved[n][1]
    return out


def pareto_allocate(costs: dict[str, dict[str, float]], errors: dict[str, dict[str, float]],
                    budget: float) -> tuple[dict[str, str], float, float, list[tuple[float, float]]]:
    """Exact multiple-choice knapsack by Pareto-front merging: the choice per layer minimising the summed error
    with summed cost <= ``budget``. Returns ``(choice, cost, error, front)`` (front: every Pareto-optimal
    (cost, error) pair). Raises ``ValueError`` when even the cheapest choice exceeds the budget."""
    front: list[tuple[float, float, tuple[str, ...]]] = [(0.0, 0.0, ())]
    layers = list(costs)
    for layer in layers:
        merged = [(c + costs[layer][k], e + errors[layer][k], ch + (k,)) for c, e, ch in front for k in costs[layer]]
        merged.sort(key=lambda t: (t[0], t[1]))
        front = []
        for c, e, ch in merged:
            if c > budget:
                break
            if not front or e < front[-1][1]:
                front.append((c, e, ch))
        if not front:
            cheapest = sum(min(v.values()) for v in costs.values())
            raise ValueError(f"budget {budget:.0f} is below the cheapest allocation ({cheapest:.0f})")
    c, e, ch = front[-1]  # the front is sorted by cost with decreasing error: the last point has the least error
    return dict(zip(layers, ch)), c, e, [(p[0], p[1]) for p in front]


@dataclass
class MixedPrecisionPlan:
    """A per-layer weight-format allocation."""

    specs: dict[str, QuantSpec]
    budget_bits: float
    cost_bits: float
    predicted_error: float
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_config(self, base: QuantConfig) -> QuantConfig:
        """``base`` with one exact-name override per layer."""
        return base.replace(overrides=tuple(self.specs.items()) + tuple(base.overrides),
                            name=f"{base.name}+mixed")

    def to_dict(self) -> dict:
        return {"budget_bits": self.budget_bits, "cost_bits": self.cost_bits,
                "predicted_error": self.predicted_error, "sensitivity": self.sensitivity,
                "specs": {n: config_to_dict(QuantConfig(weight=s))["weight"] for n, s in self.specs.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> MixedPrecisionPlan:
        d = json.loads(text)
        specs = {n: config_from_dict({"weight": s}).weight for n, s in d["specs"].items()}
        return cls(specs, d["budget_bits"], d["cost_bits"], d["predicted_error"], d.get("sensitivity", {}))


def allocate(model: nn.Module, sensitivity: dict[str, dict[str, float]], candidates: Sequence[QuantSpec],
             budget_bits: float) -> MixedPrecisionPlan:
    """The Pareto-optimal allocation of ``candidates`` (by format name) to the layers of ``sensitivity`` within
    ``budget_bits`` of weight storage."""
    by_name = {s.format: s for s in candidates}
    sizes = {n: model.get_submodule(n).weight.numel() for n in sensitivity}
    costs = {n: {f: sizes[n] * spec_bits(by_name[f]) for f in sensitivity[n]} for n in sensitivity}
    choice, cost, err, _ = pareto_allocate(costs, sensitivity, budget_bits)
    return MixedPrecisionPlan({n: by_name[f] for n, f in choice.items()}, budget_bits, cost, err, sensitivity)


def average_bits_budget(model: nn.Module, names: Sequence[str], bits: float) -> float:
    """The budget of ``bits`` per weight element over layers ``names``."""
    return bits * sum(model.get_submodule(n).weight.numel() for n in names)
