"""Learned weight rounding: AdaRound (INT and FP grids) and GPTQ, on inputs streamed from a bounded cache.
:func:`reconstruct` is what :func:`dmq.calibrate` runs when ``config.rounding`` or ``config.format_search`` asks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from dmq.rounding.adaround import RoundingResult, adaround, layer_error
from dmq.rounding.cache import CacheStats, Reservoir, SpilledInputs, capture, iter_layer_inputs, row_width
from dmq.rounding.gptq import gptq
from dmq.rounding.grid import WeightGrid, weight_grid
from dmq.rounding.layer import requantize_rtn, set_weight_fq, split_of, target_weight

if TYPE_CHECKING:
    from dmq.api import QuantState

logger = logging.getLogger(__name__)

__all__ = [
    "CacheStats", "Reservoir", "RoundingResult", "SpilledInputs", "WeightGrid", "adaround", "capture", "gptq",
    "iter_layer_inputs", "layer_error", "reconstruct", "requantize_rtn", "set_weight_fq", "target_weight",
    "weight_grid",
]


def reconstruct(model: nn.Module, state: QuantState, run_loop: Callable[[], None], spill_dir: str | None = None
                ) -> dict:
    """Per layer: capture inputs (bounded cache), optionally search the FP format, then learn the rounding.
    The learned quantized weight goes to the layer's ``weight_fq``. Returns a report (errors relative to
    round-to-nearest, cache passes and peak bytes, time).

    Memory: every layer's inputs are captured first, those beyond the cache budget into file mappings in
    ``spill_dir`` (:class:`~dmq.rounding.cache.SpilledInputs`), so that no loop run needs a float weight after its
    layer is rounded. Layers are then rounded from the smallest working set to the largest (GPTQ's is two
    ``K x K`` float64 matrices), and each rounded layer's float weight moves to a file mapping
    (:func:`dmq.spill.release_weight`): the quantized forward reads ``weight_fq``, not the float weight. The
    peak is the float model plus the smaller layers' working sets, not the float model plus the quantized one plus
    the largest working set (docs/memory.md). Each layer's result does not depend on the order."""
    from dmq.format_search import search_format
    from dmq.spill import release_weight, return_freed_memory

    cfg = state.config
    t0 = time.perf_counter()
    from dmq.api import matmul_layers

    mods = {n: model.get_submodule(n) for n in matmul_layers(model, state)}  # lookup tables stay round-to-nearest
    per_sample = set(state.per_sample)

    def rounding_of(name: str) -> str:
        if getattr(mods[name], "groups", 1) != 1:
            return "rtn"  # grouped / depthwise convolutions: the layer cache holds dense im2col rows
        if mods[name].weight.device.type == "meta":  # offloaded: hooks bring its weight by name at each call
            logger.warning("%s is offloaded (weight on the meta device): round-to-nearest, no learned rounding", name)
            return "rtn"
        return cfg.per_sample_rounding if name in per_sample else cfg.rounding

    if not cfg.format_search:  # layers left at round-to-nearest need no cache
        mods = {n: m for n, m in mods.items() if rounding_of(n) != "rtn"}
    from dmq.rounding.block import find_blocks, reconstruct_blocks

    blocks = find_blocks(model, [n for n in mods if n not in per_sample]) \
        if cfg.rounding == "adaround" and cfg.reconstruction == "block" else []
    in_blocks = {n for _, inner in blocks for n in inner}
    if not cfg.format_search:  # block layers need no layer cache
        mods = {n: m for n, m in mods.items() if n not in in_blocks}
    stats = CacheStats()
    ratios, formats = {}, {}
    budget = cfg.cache_mb * 2 ** 20
    inputs = SpilledInputs(budget, spill_dir)
    for name, x in iter_layer_inputs(model, run_loop, mods, cfg.calib_rows, budget, stats):
        inputs.put(name, x)
    release = not blocks  # block reconstruction runs the loop again, in full precision: those weights stay
    order = sorted(inputs.names, key=lambda n: (row_width(mods[n]), mods[n].weight.numel()))
    for name in order:
        m, x = mods[name], inputs.take(name)
        if x.numel() == 0:
            logger.info("%s saw no calibration input: keeping round-to-nearest", name)
            continue
        w = target_weight(m).reshape(m.weight.shape)
        rows = w.reshape(w.shape[0], -1)
        if cfg.format_search:
            hess = x.T @ x / x.shape[0]
            spec, _ = search_format(w, hess, m.weight_spec, split_of(m))
            if spec != m.weight_spec:
                m.weight_spec = spec
                formats[name] = spec.format
                state.learned_overrides[name] = spec
            requantize_rtn(m)
        rounding = rounding_of(name)
        if rounding != "rtn" and name not in in_blocks:
            grid = weight_grid(w, m.weight_spec, split_of(m))
            if rounding == "adaround":
                res = adaround(rows, x, grid, iters=cfg.rounding_iters)
            else:
                res = gptq(rows, x, grid)
            set_weight_fq(m, res.weight)
            ratios[name] = res.error / res.rtn_error if res.rtn_error > 0 else 1.0
        elif not cfg.format_search:
            continue
        del x, w, rows
        if release and release_weight(m, spill_dir):
            return_freed_memory()
    ratios = {n: ratios[n] for n in mods if n in ratios}  # reported in model order, whatever the rounding order
    formats = {n: formats[n] for n in mods if n in formats}
    report = {"cache_passes": stats.passes, "cache_peak_bytes": stats.peak_bytes, "error_vs_rtn": ratios}
    if blocks:
        report.update(reconstruct_blocks(model, blocks, run_loop, cfg.rounding_iters))
        report["cache_passes"] += 1
    report["reconstruct_s"] = time.perf_counter() - t0
    if cfg.format_search:
        report["formats"] = formats
    return report
