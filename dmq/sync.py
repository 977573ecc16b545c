"""Exact cross-process reduction of calibration statistics (data-parallel calibration).

Each process calibrates on its share of the data; :func:`sync_statistics` then makes every process hold the
statistics of the union: per timestep bin, ``min`` reduces by MIN, ``max`` by MAX, element counts, non-finite counts
and histogram counts by SUM. Histograms are first brought to the largest radius of any process by the observer's own
bin merging (radii are powers of two and binning is exact, so a histogram built at radius ``r`` and doubled equals
one built at ``2r``). Every reduced quantity is an integer count or an extremum, so the result equals a
single-process calibration over the same backbone calls bit for bit, whatever the split.

Uses ``torch.distributed`` only when it is initialised; otherwise a no-op.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dmq.quantizer import TensorQuantizer

logger = logging.getLogger(__name__)


def _observers(model: nn.Module) -> list:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and m.observer is not None:
            out.append((name, m.observer))
    return out


def align(obs, radii: torch.Tensor) -> None:
    """Bring each timestep bin's histogram of ``obs`` to radius ``radii[k]`` (a power of two >= its own, or 0) by
    exact bin merging."""
    for k in range(obs.num_bins):
        target = float(radii[k])
        if obs.radius[k] == 0:  # nothing but zeros here (kept in the middle bin at any radius)
            obs.radius[k] = target
        while obs.radius[k] < target:
            obs._double(k)


def sync_statistics(model: nn.Module, group: object | None = None) -> int:
    """All-reduce the observer statistics of ``model`` over ``group`` (default: the world); returns the number of
    processes reduced over (1 without an initialised process group).

    Call it once on every process after the last :func:`dmq.calibrate` and before :func:`dmq.freeze`; all processes
    must hold the same quantized model (same modules, same configs). Calling it twice counts the data twice.
    """
    st = getattr(model, "_dmq", None)
    if st is None:
        raise ValueError("model is not quantized: call dmq.quantize(model, config) first")
    if st.frozen:
        raise ValueError("model is frozen: sync_statistics runs between dmq.calibrate and dmq.freeze")
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    world = dist.get_world_size(group)
    if world == 1:
        return 1
    obs = [o for _, o in _observers(model)]
    # the reduction runs on the backend's device: CUDA for NCCL, the CPU for gloo
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"

    def reduce(parts: list[torch.Tensor], op) -> torch.Tensor:
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        flat = torch.cat([p.reshape(-1).double() for p in parts]).to(device)
        dist.all_reduce(flat, op=op, group=group)
        return flat.cpu()

    Op = dist.ReduceOp
    mins = reduce([o.min for o in obs], Op.MIN)
    maxs = reduce([o.max for o in obs], Op.MAX)
    # counts are int64 on the observers; the float64 sum is exact below 2**53
    counts = reduce([o.count for o in obs] + [o.nonfinite_bins for o in obs], Op.SUM)
    with_hist = [o for o in obs if o.hist is not None]
    radii = reduce([o.radius for o in with_hist], Op.MAX)
    pos = 0
    for o in with_hist:
        align(o, radii[pos:pos + o.num_bins])
        pos += o.num_bins
    hists = reduce([o.hist for o in with_hist], Op.SUM)

    pos = cpos = hpos = npos = 0
    n_obs, first_nonfinite = len(obs), sum(o.num_bins for o in obs)
    for o in obs:
        b = o.num_bins
        o.min.copy_(mins[pos:pos + b])
        o.max.copy_(maxs[pos:pos + b])
        o.count.copy_(counts[pos:pos + b].round().long())
        o.nonfinite_bins.copy_(counts[first_nonfinite + npos:first_nonfinite + npos + b].round().long())
        npos += b
        pos += b
        if o.hist is not None:
            o.radius.copy_(radii[cpos:cpos + b])
            o.hist.copy_(hists[hpos:hpos + o.hist.numel()].reshape(o.hist.shape))
            cpos += b
            hpos += o.hist.numel()
    st.calibration_points = int(reduce([torch.tensor([float(st.calibration_points)])], Op.SUM)[0])
    logger.info("dmq: reduced the statistics of %d observers over %d processes", n_obs, world)
    return world
