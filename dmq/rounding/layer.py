"""A quantized layer's weight as ``(O, K)`` rows, and writing back its quantized weight."""

from __future__ import annotations

import torch
from torch import nn

from dmq.fake_quant import quantize_weight
from dmq.held_weight import held


def target_weight(module: nn.Module) -> torch.Tensor:
    """The float weight the quantized path has to approximate, as ``(O, K)`` float32 rows: the effective weight
    (after input rotation) minus the low-rank branch."""
    with torch.no_grad():
        w = module.effective_weight().detach().float()
        if module.lowrank_down is not None:
            w = w - (module.lowrank_up.float() @ module.lowrank_down.float().reshape(module.lowrank_down.shape[0], -1)
                     ).reshape(w.shape)
        return w.reshape(w.shape[0], -1)


def split_of(module: nn.Module) -> int | None:
    return getattr(module, "split", None)


@torch.no_grad()
def set_weight_fq(module: nn.Module, rows: torch.Tensor) -> None:
    """Store ``rows`` (``(O, K)``) as the module's quantized weight, packed when it lies on the grid
    (:func:`dmq.held_weight.held`). The buffer is replaced, never written in place, so that a transaction
    (:mod:`dmq.transaction`) rolls it back by reference, without a copy of every weight."""
    shape = module.weight.shape
    fq = module._buffers["weight_fq"]  # None: not built yet (dmq.modules.PackedMixin.weight_fq), the weight's dtype
    target = rows.reshape(shape).to(module.weight.dtype if fq is None else fq.dtype)
    w = target_weight(module).reshape(shape) if module.weight_spec is not None else target
    module._buffers["weight_fq"] = held(w, module.weight_spec, split_of(module), target)


@torch.no_grad()
def requantize_rtn(module: nn.Module) -> None:
    """Round-to-nearest quantized weight of :func:`target_weight` under the module's weight spec (after a transform
    changed the weight)."""
    spec = module.weight_spec
    w = target_weight(module)
    if spec is None:
        set_weight_fq(module, w)
        return
    s = split_of(module)

    def q(x: torch.Tensor) -> torch.Tensor:
        return quantize_weight(x, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)

    if s is None:
        set_weight_fq(module, q(w))
    else:
        cut = s * (w.shape[1] // module.weight.shape[1])
        set_weight_fq(module, torch.cat([q(w[:, :cut]), q(w[:, cut:])], 1))
