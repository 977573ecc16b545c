"""Equivalence transforms applied before weight quantization: SmoothQuant channel balancing (folded), input
rotation, and the 16-bit low-rank branch. :func:`apply_transforms` is what :func:`dmq.calibrate` runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from dmq.calibration import CONTEXT, layer_input
from dmq.rounding.layer import requantize_rtn, target_weight
from dmq.transforms.lowrank import low_rank
from dmq.transforms.rotation import block_hadamard, hadamard, random_orthogonal, rotation_matrix
from dmq.transforms.smooth import ALPHAS, ChannelStats, SmoothGroup, find_groups, fold, group_error, smooth_scales

if TYPE_CHECKING:
    from dmq.api import QuantState

logger = logging.getLogger(__name__)

__all__ = [
    "ALPHAS", "SmoothGroup", "apply_transforms", "block_hadamard", "find_groups", "fold", "hadamard", "low_rank",
    "random_orthogonal", "rotation_matrix", "smooth", "smooth_scales",
]


def smooth(model: nn.Module, state: QuantState, run_loop: Callable[[], None], report: dict) -> None:
    """Statistics pass, alpha search and folding for every foldable group (config ``smooth``)."""
    cfg = state.config
    quantized = {n for n in state.modules if isinstance(model.get_submodule(n), nn.Linear)}
    groups = find_groups(model, quantized)
    if not groups:
        logger.info("smoothing: no layer group with a foldable predecessor")
        report["smooth_groups"] = 0
        return
    gen = torch.Generator().manual_seed(0)
    needed = {c for g in groups for c in g.consumers[:1]}
    stats = {n: ChannelStats(512, gen, *cfg.timestep_range) for n in needed}

    def hook(name):
        def pre(mod, args, kwargs):
            if CONTEXT.observe:
                stats[name].add(layer_input(args, kwargs))
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in needed]
    try:
        run_loop()
    finally:
        for h in handles:
            h.remove()
    alphas = {}
    for g in groups:
        st = stats[g.consumers[0]]
        if not st.amax:
            continue
        act = st.salience()
        mods = [model.get_submodule(c) for c in g.consumers]
        weights = [m.weight.detach() for m in mods]
        specs = [m.weight_spec for m in mods]
        x = st.rows.rows()
        cands = [None] + ([float(cfg.smooth)] if cfg.smooth != "search" else list(ALPHAS))
        best, best_err = None, None
        for a in cands:
            s = torch.ones_like(act) if a is None else smooth_scales(act, weights, a)
            err = group_error(x, weights, s, specs, cfg.act)
            if best_err is None or err < best_err:
                best, best_err = (a, s), err
        a, s = best
        alphas[",".join(g.consumers)] = a
        if a is not None:
            fold(model, g, s, state.originals)
    report["smooth_groups"] = len(groups)
    report["smooth_alpha"] = alphas


@torch.no_grad()
def rotate(model: nn.Module, state: QuantState, report: dict) -> None:
    n = 0
    for k, name in enumerate(state.modules):
        m = model.get_submodule(name)
        if getattr(m, "rotation", None) is None:
            continue
        r = rotation_matrix(state.config.rotation, m.rotation.shape[0], seed=k)
        m.rotation.copy_(r.to(m.rotation))
        n += 1
    report["rotated_layers"] = n


@torch.no_grad()
def add_lowrank(model: nn.Module, state: QuantState, report: dict) -> None:
    n = 0
    for name in state.modules:
        m = model.get_submodule(name)
        if getattr(m, "lowrank_down", None) is None:
            continue
        m.lowrank_down.zero_()
        m.lowrank_up.zero_()
        up, down = low_rank(target_weight(m), m.lowrank_down.shape[0])
        m.lowrank_up.copy_(up.to(m.lowrank_up))
        m.lowrank_down.copy_(down.reshape(m.lowrank_down.shape).to(m.lowrank_down))
        n += 1
    report["lowrank_layers"] = n


def apply_transforms(model: nn.Module, state: QuantState, run_loop: Callable[[], None]) -> dict:
    """Smoothing (needs one run of the loop), then rotation, then the low-rank branch; then every quantized layer's
    weight is re-quantized by round-to-nearest from its new target. Returns a report."""
    cfg, report = state.config, {}
    t0 = time.perf_counter()
    if cfg.smooth is not None:
        smooth(model, state, run_loop, report)
    if cfg.rotation is not None:
        rotate(model, state, report)
    if cfg.lowrank:
        add_lowrank(model, state, report)
    for name in state.modules:
        m = model.get_submodule(name)
        if m.weight_spec is not None or cfg.learns_weights:
            requantize_rtn(m)
    report["transform_s"] = time.perf_counter() - t0
    return report
