"""BRECQ (Li et al., 2021): AdaRound with the output of a whole block as the objective.

Inside a block (a DiT transformer block, a U-Net resnet or attention block) the layers' rounding errors interact;
BRECQ learns every layer's rounding jointly on the block output (eq. 10 with the squared-error surrogate), which
lets a layer compensate for the error of the layers before it. Block inputs (positional and keyword tensors, a few
samples per backbone call) are kept in a reservoir of calls, so the cache is bounded; targets are the block's
full-precision outputs on them. Activations stay in full precision during the reconstruction. A block keeps the
learned rounding only when its block output error is not above round-to-nearest's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch
from torch import nn

from dmq.calibration import CONTEXT, call_scope
from dmq.rounding.adaround import GAMMA, ZETA, _h
from dmq.rounding.grid import weight_grid
from dmq.rounding.layer import set_weight_fq, split_of, target_weight

logger = logging.getLogger(__name__)

BLOCK_TYPES = ("BasicTransformerBlock", "ResnetBlock2D", "Attention")


def find_blocks(model: nn.Module, quantized: list[str]) -> list[tuple[str, list[str]]]:
    """Outermost blocks (by class name) and the quantized layers inside each."""
    blocks: list[tuple[str, list[str]]] = []
    for name, m in model.named_modules():
        if type(m).__name__ not in BLOCK_TYPES or any(name.startswith(b + ".") for b, _ in blocks):
            continue
        inner = [q for q in quantized if q.startswith(name + ".")]
        if inner:
            blocks.append((name, inner))
    return blocks


def _slice(v: object, idx: torch.Tensor, batch: int) -> object:
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
        return v.detach()[idx].clone()
    return v


class CallReservoir:
    """A uniform sample of at most ``size`` calls of a module, each cut to at most ``samples`` batch items."""

    def __init__(self, size: int, samples: int, seed: int = 0):
        self.size, self.samples, self.seen = size, samples, 0
        self.calls: list[tuple[tuple, dict]] = []
        self.rng = random.Random(seed)

    def add(self, args: tuple, kwargs: dict) -> None:
        batch = args[0].shape[0]
        idx = torch.randperm(batch, generator=torch.Generator().manual_seed(self.seen))[: self.samples]
        call = (tuple(_slice(a, idx, batch) for a in args), {k: _slice(v, idx, batch) for k, v in kwargs.items()})
        self.seen += 1
        if len(self.calls) < self.size:
            self.calls.append(call)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.calls[j] = call

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for a, k in self.calls for v in (*a, *k.values())
                   if isinstance(v, torch.Tensor))


def _output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def reconstruct_block(block: nn.Module, layers: list[nn.Module], calls: list[tuple[tuple, dict]], iters: int,
                      lr: float = 0.1, reg_weight: float = 10.0, warmup: float = 0.2, seed: int = 0
                      ) -> tuple[float, float]:
    """Joint AdaRound of ``layers`` on the output of ``block`` over ``calls``; returns (error, RTN error) of the
    block output (mean squared error over the calls), the kept result's first."""
    with call_scope(calibrating=True, observe=False), torch.no_grad():  # full-precision targets
        targets = [_output(block(*a, **k)).detach() for a, k in calls]
    state = []
    for m in layers:
        w = target_weight(m).reshape(m.weight.shape)
        grid = weight_grid(w, m.weight_spec, split_of(m))
        rows = w.reshape(w.shape[0], -1)
        lo, hi = grid.neighbours(rows)
        gap = hi - lo
        movable = gap > 0
        frac = torch.where(movable, (rows - lo) / torch.where(movable, gap, 1.0), torch.zeros_like(rows))
        p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        state.append((m, lo, gap, movable, grid.nearest(rows), torch.log(p / (1 - p)).requires_grad_(True)))

    def block_error() -> float:
        with torch.no_grad():
            return sum(float((_output(block(*a, **k)) - t).pow(2).mean()) for (a, k), t in zip(calls, targets))

    for m, _, _, _, rtn, _ in state:
        set_weight_fq(m, rtn)
    rtn_err = block_error()
    params = [p for p in block.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients only for the rounding variables, never into the user's parameters
    opt = torch.optim.Adam([s[-1] for s in state], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n_move = max(sum(int(s[3].sum()) for s in state), 1)
    try:
        with torch.enable_grad():
            for it in range(iters):
                for m, lo, gap, _, _, v in state:
                    m._buffers["weight_fq"] = (lo + _h(v) * gap).reshape(m.weight_fq.shape)
                j = int(torch.randint(0, len(calls), (1,), generator=gen))
                (a, k), t = calls[j], targets[j]
                loss = (_output(block(*a, **k)) - t).pow(2).mean() * len(calls) / max(rtn_err, 1e-30)
                if it >= warmup * iters:
                    beta = 20 + (2 - 20) * (it - warmup * iters) / max((1 - warmup) * iters, 1)
                    reg = sum((1 - (2 * _h(v)[mov] - 1).abs().pow(beta)).sum() for _, _, _, mov, _, v in state)
                    loss = loss + reg_weight * reg / n_move
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, lo, gap, mov, _, v in state:
            m._buffers["weight_fq"] = m.weight_fq.detach().clone()
    for m, lo, gap, mov, _, v in state:
        set_weight_fq(m, lo + ((_h(v.detach()) >= 0.5) & mov) * gap)
    err = block_error()
    if err > rtn_err:
        for m, _, _, _, rtn, _ in state:
            set_weight_fq(m, rtn)
        return rtn_err, rtn_err
    return err, rtn_err


def reconstruct_blocks(model: nn.Module, blocks: list[tuple[str, list[str]]], run_loop: Callable[[], None],
                       iters: int, calls: int = 8, samples: int = 2) -> dict:
    """Capture every block's inputs in one run of the loop (bounded: ``calls`` calls of ``samples`` items per
    block), then reconstruct block by block. Returns per-block error ratios and the cache's bytes."""
    res = {name: CallReservoir(calls, samples, seed=i) for i, (name, _) in enumerate(blocks)}

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if CONTEXT.observe and args and isinstance(args[0], torch.Tensor):
                res[name].add(args, kwargs)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n, _ in blocks]
    try:
        run_loop()
    finally:
        for h in handles:
            h.remove()
    cache_bytes = sum(r.nbytes() for r in res.values())
    ratios = {}
    qs = [m for m in model.modules() if type(m).__name__ == "TensorQuantizer"]
    enabled = [q.enabled for q in qs]
    for q in qs:  # weight-only reconstruction: activations in full precision
        q.enabled = False
    try:
        for name, inner in blocks:
            if not res[name].calls:
                continue
            block = model.get_submodule(name)
            layers = [model.get_submodule(n) for n in inner]
            err, rtn = reconstruct_block(block, layers, res[name].calls, iters)
            ratios[name] = err / rtn if rtn > 0 else 1.0
    finally:
        for q, e in zip(qs, enabled):
            q.enabled = e
    return {"block_error_vs_rtn": ratios, "block_cache_bytes": cache_bytes}
