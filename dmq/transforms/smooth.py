"""SmoothQuant (Xiao et al., 2023) channel balancing, timestep-aware, with the scales folded into the graph.

For a group of Linear layers that read the same input ``X``, ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T`` with
``s_j = a_j^alpha / w_j^(1 - alpha)`` (eq. 4): ``a_j`` the salience of input channel ``j``, ``w_j = max |W[:, j]|``
over the group. Diffusion activations change with the timestep, so ``a_j`` is the root mean square over timestep
bins of the per-bin maximum ``|X_j|``: a channel that is large at a few timesteps counts, one timestep does not
decide alone. Alpha is searched per group by the output error of the quantized group on cached inputs; ``s = 1``
(no smoothing) is among the candidates, so the search never picks worse than no smoothing on that objective.

``diag(s)^-1`` is folded into what produces ``X``, so the balancing costs nothing at inference:

* an affine LayerNorm / GroupNorm: its weight and bias are divided by ``s``;
* the adaLN-Zero modulation ``x * (1 + scale) + shift`` of a DiT block: the modulation Linear's shift rows are
  divided by ``s`` and its scale rows map to ``(1 + scale) / s - 1``;
* the value projection of an attention module, for its output projection: ``P (V / s) = (P V) / s``.

Layer groups without such a predecessor are not smoothed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dmq.calibration import CONTEXT, timestep_bins
from dmq.config import QuantSpec
from dmq.fake_quant import quantize_rows_dynamic
from dmq.rounding.cache import Reservoir

logger = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
STAT_BINS = 10


@dataclass
class SmoothGroup:
    """Consumers reading one input, and the predecessor that absorbs ``1 / s``."""

    consumers: list[str]
    kind: str  # "norm" | "adaln" | "value"
    predecessor: str
    chunks: tuple[int, int] = (0, 1)  # adaLN: (shift chunk, scale chunk) of the modulation Linear
    num_chunks: int = 6


def _is_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def find_groups(model: nn.Module, quantized: set[str]) -> list[SmoothGroup]:
    """The foldable groups among the quantized Linear layers ``quantized``."""
    groups: list[SmoothGroup] = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        norm1 = getattr(m, "norm1", None)
        if (type(norm1).__name__ == "AdaLayerNormZero" and getattr(m, "norm_type", None) == "ada_norm_zero"
                and isinstance(getattr(norm1, "linear", None), nn.Linear)):
            qkv = [f"{pre}attn1.{p}" for p in ("to_q", "to_k", "to_v")]
            attn1 = getattr(m, "attn1", None)
            if (attn1 is not None and getattr(attn1, "norm_cross", None) is None and not getattr(attn1,
                                                                                              "is_cross_attention",
                                                                                              False)
                    and all(q in quantized for q in qkv)):
                groups.append(SmoothGroup(qkv, "adaln", f"{pre}norm1.linear", (0, 1)))
            proj = f"{pre}ff.net.0.proj"
            if proj in quantized and type(m.ff.net[0]).__name__ == "GELU":
                groups.append(SmoothGroup([proj], "adaln", f"{pre}norm1.linear", (3, 4)))
        elif _is_attention(m):
            qkv = [f"{pre}{p}" for p in ("to_q", "to_k", "to_v")]
            gn = getattr(m, "group_norm", None)
            if (isinstance(gn, nn.GroupNorm) and gn.affine and getattr(m, "spatial_norm", None) is None
                    and all(q in quantized for q in qkv)):
                groups.append(SmoothGroup(qkv, "norm", f"{pre}group_norm"))
        if _is_attention(m) and f"{pre}to_out.0" in quantized and f"{pre}to_v" in quantized:
            groups.append(SmoothGroup([f"{pre}to_out.0"], "value", f"{pre}to_v"))
    return groups


class ChannelStats:
    """Per-timestep-bin max ``|x_j|`` of a layer's input, plus a row reservoir for the alpha search."""

    def __init__(self, rows: int, gen: torch.Generator, lo: float, hi: float):
        self.amax: dict[int, torch.Tensor] = {}
        self.rows = Reservoir(rows, gen)
        self.lo, self.hi = lo, hi

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        t, lo, hi = CONTEXT.timestep, *(CONTEXT.range or (self.lo, self.hi))  # the model's convention
        b = 0 if t is None else int(timestep_bins(t.float().mean().reshape(1), STAT_BINS, lo, hi)[0])
        m = flat.abs().amax(0)
        self.amax[b] = m if b not in self.amax else torch.maximum(self.amax[b], m)
        self.rows.add(flat[torch.randperm(flat.shape[0], generator=self.rows.gen)[:256]])

    def salience(self) -> torch.Tensor:
        """Root mean square over the observed timestep bins of the per-bin channel maxima."""
        return torch.stack(list(self.amax.values())).pow(2).mean(0).sqrt()


def smooth_scales(act: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1 - alpha)`` (SmoothQuant eq. 4), with ``w_j`` the max over the group's columns."""
    w = torch.stack([x.detach().float().abs().amax(0) for x in weights]).amax(0)
    s = act.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def group_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, wspecs: list[QuantSpec | None],
                act: QuantSpec | None) -> float:
    """Output error of the quantized group for input rows ``x`` under smoothing ``s``: per-tensor (or the act
    spec's dynamic granularity) quantization of ``x / s``, round-to-nearest of ``W diag(s)``."""
    from dmq.fake_quant import quantize_weight  # local: keeps the module import light

    xs = x / s
    if act is not None:
        gran = act.granularity if act.dynamic else "tensor"
        xs = quantize_rows_dynamic(xs, act.fmt, gran, act.group_size, act.symmetric)
    err = 0.0
    for w, spec in zip(weights, wspecs):
        ws = w.float() * s
        if spec is not None:
            ws = quantize_weight(ws, spec.fmt, spec.granularity, spec.group_size, spec.symmetric, spec.estimator)
        err += float((xs @ ws.T - x @ w.float().T).pow(2).mean())
    return err


def _remember(originals: dict[str, torch.Tensor], name: str, p: torch.Tensor | None) -> None:
    if p is not None and name not in originals:
        originals[name] = p.detach().clone()


@torch.no_grad()
def fold(model: nn.Module, group: SmoothGroup, s: torch.Tensor, originals: dict[str, torch.Tensor]) -> None:
    """Apply ``diag(s)^-1`` to the predecessor and ``diag(s)`` to the consumers' weight columns (exact in FP)."""
    pred = model.get_submodule(group.predecessor)
    for p in ("weight", "bias"):
        _remember(originals, f"{group.predecessor}.{p}", getattr(pred, p, None))
    if group.kind == "norm":
        pred.weight.div_(s.to(pred.weight))
        if pred.bias is not None:
            pred.bias.div_(s.to(pred.bias))
    elif group.kind == "value":
        pred.weight.div_(s.to(pred.weight)[:, None])
        if pred.bias is not None:
            pred.bias.div_(s.to(pred.bias))
    else:
        d = pred.out_features // group.num_chunks
        sh, sc = (slice(c * d, (c + 1) * d) for c in group.chunks)
        sw = s.to(pred.weight)
        pred.weight[sh].div_(sw[:, None])
        pred.weight[sc].div_(sw[:, None])
        if pred.bias is not None:
            pred.bias[sh].div_(sw)
            pred.bias[sc].add_(1).div_(sw).sub_(1)
    for c in group.consumers:
        m = model.get_submodule(c)
        _remember(originals, f"{c}.weight", m.weight)
        m.weight.mul_(s.to(m.weight)[None, :])
