"""A memory budget for the whole backbone: ``QuantConfig(memory_budget=...)``.

The budget counts every parameter and buffer of the model, quantized or not (kept layers, biases, norms, position
tables), in bits per parameter (``4.5``, ``"4.5bits"``) or in bytes (``"7GB"``, ``"900MiB"``, ``7e9``). What is left
after the fixed part is shared among the quantized layers' weights by :func:`dmq.mixed_precision.pareto_allocate`
(exact multiple-choice knapsack), over a ladder of weight formats, with a data-driven error per layer and format: the
layer's relative output error under that format, ``sum_oc (W - Q(W))_oc^2 E[x_c^2] / sum_oc W_oc^2 E[x_c^2]``
(the diagonal-Hessian proxy of HAWQ-V2 / OBQ; ``E[x_c^2]`` streams from the calibration run). A budget no candidate
allocation reaches raises ``ValueError`` with the smallest reachable size, at :func:`dmq.quantize` time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from dmq.calibration import layer_input
from dmq.config import QuantConfig, QuantSpec
from dmq.fake_quant import quantize_weight

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}


def model_numel(model: nn.Module) -> int:
    """Elements of every parameter and buffer (shared tensors once)."""
    return sum(t.numel() for t in _tensors(model))


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def budget_bytes(budget: float | str, numel: int) -> float:
    """The budget in bytes for a model of ``numel`` parameter and buffer elements. Numbers up to 32 are bits per
    parameter, larger numbers bytes; strings carry a unit (``"4.5bits"``, ``"4.5bpp"``, ``"7GB"``, ``"512MiB"``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"memory_budget must be a number or a string with a unit, got {budget!r}")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z/]*)\s*", budget)
        unit = m.group(2).lower() if m else ""
        if m is None or not (unit in _UNITS or unit in ("bits", "bit", "bpp", "bits/param")):
            raise ValueError(f"memory_budget {budget!r}: expected a number with a unit: bits per parameter "
                             f"('4.5bits', '4.5bpp') or bytes ({', '.join(u.upper() for u in _UNITS)})")
        value = float(m.group(1))
        return value * numel / 8 if unit.startswith("b") and unit not in _UNITS else value * _UNITS[unit]
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return budget * numel / 8 if budget <= 32 else float(budget)


def candidates(config: QuantConfig) -> list[QuantSpec]:
    """The weight formats the allocator chooses from: 4-bit group-wise, the config's own, 6- and 8-bit per channel."""
    ladder = [QuantSpec("int4", "group", group_size=32, estimator="mse"), config.weight,
              QuantSpec("int6", "channel", estimator="mse"), QuantSpec("int8", "channel", estimator="mse")]
    out: list[QuantSpec] = []
    for s in ladder:
        if s is not None and s not in out:
            out.append(s)
    return out


def spec_bytes(spec: QuantSpec, shape: Sequence[int]) -> float:
    """Packed bytes of a weight of ``shape`` under ``spec``: codes plus scales (16-bit group scales, 32-bit
    channel / tensor scales and zero points as packing stores them at most)."""
    rows, cols = shape[0], math.prod(shape[1:])
    fmt = spec.fmt
    # rows are padded to whole groups / blocks, and codes under 8 bits to whole bytes of 8 codes (dmq.packed)
    group = fmt.block_size if spec.granularity == "block" else spec.group_size if spec.granularity == "group" else 1
    padded = math.ceil(cols / group) * group
    bits = fmt.element.bits if fmt.is_block else fmt.bits
    codes = rows * (math.ceil(padded / 8) * 8 if bits < 8 else padded) * bits / 8
    if spec.granularity == "block":  # one-byte block scales (E8M0 / E4M3), NVFP4's FP32 tensor scale
        return codes + rows * padded // group + 4
    zp = 1 if not spec.symmetric else 0
    if spec.granularity == "group":
        return codes + rows * (padded // group) * (2 + zp)
    if spec.granularity == "channel":
        return codes + rows * (4 + zp)
    return codes + 4 + zp


def _weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight for n in names}


def fixed_bytes(model: nn.Module, names: Sequence[str], tables: dict[str, QuantSpec] | None = None) -> float:
    """Bytes of everything but the weights of layers ``names`` (kept layers, biases, norms, buffers); the embedding
    tables ``tables`` (name: spec, quantized at :func:`dmq.quantize` by a fixed spec) at their packed size."""
    tables = tables or {}
    skip = {id(w) for w in _weights(model, [*names, *tables]).values()}
    packed = sum(spec_bytes(s, model.get_submodule(n).weight.shape) for n, s in tables.items())
    return sum(t.numel() * t.element_size() for t in _tensors(model) if id(t) not in skip) + packed


def smallest_bytes(model: nn.Module, names: Sequence[str], config: QuantConfig,
                   tables: dict[str, QuantSpec] | None = None) -> float:
    cands = candidates(config)
    return fixed_bytes(model, names, tables) + sum(min(spec_bytes(s, w.shape) for s in cands)
                                                   for w in _weights(model, names).values())


def check_reachable(model: nn.Module, names: Sequence[str], config: QuantConfig,
                    tables: dict[str, QuantSpec] | None = None) -> float:
    """The budget in bytes; ``ValueError`` giving the smallest reachable size when the budget is below it."""
    total = budget_bytes(config.memory_budget, model_numel(model))
    low = smallest_bytes(model, names, config, tables)
    if total < low:
        raise ValueError(
            f"memory_budget {config.memory_budget!r} ({total / 2 ** 20:.2f} MiB) is below the smallest reachable size "
            f"of this model: {low / 2 ** 20:.2f} MiB ({8 * low / model_numel(model):.3f} bits per parameter, with "
            f"every quantized layer at its cheapest format: {', '.join(s.format for s in candidates(config))})")
    return total


@torch.no_grad()
def layer_error(weight: torch.Tensor, second_moment: torch.Tensor | None, spec: QuantSpec) -> float:
    """Relative output error proxy of a layer quantized to ``spec``, inputs with per-channel ``E[x_c^2]``."""
    w = weight.detach().float()
    wq = quantize_weight(w, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator).float()
    d2, w2 = (wq - w).pow(2), w.pow(2)
    if second_moment is not None:
        m = second_moment.float().reshape(1, -1, *([1] * (w.dim() - 2)))
        d2, w2 = d2 * m, w2 * m
    return float(d2.sum() / w2.sum().clamp_min(1e-30))


class SecondMoments:
    """Forward pre-hooks that stream ``E[x_c^2]`` over the input channels of the given layers."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.hooks = [model.get_submodule(n).register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in names]

    def _hook(self, name: str):
        def pre(mod, args, kwargs):
            x = layer_input(args, kwargs).detach().float()
            x = x.transpose(1, -1) if not isinstance(mod, nn.Linear) and x.dim() > 2 else x  # channels last
            x = x.reshape(-1, x.shape[-1])
            s = x.pow(2).sum(0)
            self.sums[name] = self.sums[name] + s if name in self.sums else s
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        return pre

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.hooks:
            h.remove()
        return {n: s / max(self.counts[n], 1) for n, s in self.sums.items()}


def allocate_budget(model: nn.Module, names: Sequence[str], config: QuantConfig, moments: dict[str, torch.Tensor],
                    total: float, fixed: float) -> tuple[dict[str, QuantSpec], dict]:
    """Per-layer weight formats minimising the summed error proxy within ``total`` bytes, of which ``fixed`` are
    taken by what is not a quantized weight (measured on the float model by :func:`dmq.quantize`)."""
    from dmq.mixed_precision import pareto_allocate

    cands = candidates(config)
    keys = {f"{i}:{s.format}/{s.granularity}": s for i, s in enumerate(cands)}
    weights = _weights(model, names)
    costs = {n: {k: spec_bytes(s, w.shape) for k, s in keys.items()} for n, w in weights.items()}
    errors = {n: {k: layer_error(w, moments.get(n), s) for k, s in keys.items()} for n, w in weights.items()}
    choice, cost, err, _ = pareto_allocate(costs, errors, total - fixed)
    specs = {n: keys[k] for n, k in choice.items()}
    report = {"budget_bytes": total, "planned_bytes": fixed + cost, "predicted_error": err,
              "formats": {k: sum(1 for c in choice.values() if c == k) for k in keys}}
    return specs, report
