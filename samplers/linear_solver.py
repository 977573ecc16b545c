"""Every multistep solver of the diffusion ODE as one coefficient table, and the scheduler's table step.

A solver that makes one model evaluation per step is linear in its inputs: the next evaluation point is a fixed
linear combination of the current one and the data predictions so far,

    x_{i+1} = a_i x_i + sum_{k <= i} b_{i,k} x̂0_k,                                               (1)

with ``a_i`` and ``b_{i,k}`` set by the schedule alone (DEIS, UniPC with its corrector, DPM-Solver++, DC-Solver's
compensation: all are such combinations). Row ``i`` of a table is ``[a_i, b_{i,0}, ..., b_{i,i}]``. The rows of a
scheduler are read off by linearity (:func:`solver_coefficients`); :func:`samplers.fit_coefficients` fits them to a
model, and a scheduler whose config holds a fitted table steps by (1) on that table's timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["check_table", "solver_coefficients", "table_update"]


def check_table(coefficients: Sequence[Sequence[float]] | None, timesteps: Sequence[float] | None) -> None:
    """Refuse a malformed table: both ``None``, or one row per timestep with row ``i`` holding ``i + 2`` finite
    numbers, and strictly decreasing timesteps."""
    if coefficients is None and timesteps is None:
        return
    if coefficients is None or timesteps is None:
        raise ValueError("fitted_coefficients and fitted_timesteps go together: set both or neither")
    if isinstance(coefficients, (str, bytes)) or isinstance(timesteps, (str, bytes)):
        raise ValueError("fitted_coefficients must be a list of rows and fitted_timesteps a list of floats")
    rows = [list(r) for r in coefficients]
    ts = [float(t) for t in timesteps]
    if len(rows) != len(ts) or not ts:
        raise ValueError(f"fitted_coefficients has {len(rows)} rows but fitted_timesteps {len(ts)} timesteps: "
                         "one row per timestep")
    for i, row in enumerate(rows):
        if len(row) != i + 2:
            raise ValueError(f"fitted_coefficients row {i} must hold {i + 2} numbers [a_i, b_i0, ..., b_ii], "
                             f"got {len(row)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
            raise ValueError(f"fitted_coefficients row {i} must hold finite numbers, got {row}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"fitted_timesteps must be strictly decreasing, got {ts}")


def table_update(row: Sequence[float], x: torch.Tensor, x0s: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. (1): ``row[0] x + sum_k row[k + 1] x0s[k]`` (``x0s`` oldest first)."""
    out = row[0] * x if row[0] != 0 else torch.zeros_like(x)
    for c, d in zip(row[1:], x0s):
        if c != 0:
            out = out + c * d
    return out


@torch.no_grad()
def solver_coefficients(scheduler: Any, num_inference_steps: int) -> list[list[float]]:
    """The rows of Eq. (1) for ``scheduler`` (a :class:`~samplers.DEISScheduler` or
    :class:`~samplers.DCSolverScheduler`) on its ``num_inference_steps``-step grid.

    The scheduler is run once on a probe: the state has one coordinate for ``x_T`` and one for each ``x̂0_k``, and
    the model output at step ``k`` is chosen so that its data prediction is the ``k``-th unit vector. Each step's
    result then holds its own coefficients. Dynamic thresholding acts on ``x̂0`` before the solver sees it, so the
    probe runs without it (the solver is linear in the thresholded ``x̂0``). Works on a copy; a fitted table in the
    config is ignored (these are the solver's own coefficients).
    """
    if int(getattr(scheduler, "order", 1) or 1) != 1:
        raise ValueError("a coefficient table needs one model evaluation per step; Runge-Kutta stages "
                         "(deis_method='rhork') are not supported")
    probe = type(scheduler).from_config(scheduler.config, thresholding=False, fitted_coefficients=None,
                                        fitted_timesteps=None)
    probe.set_timesteps(num_inference_steps)
    n = len(probe.timesteps)
    x = torch.zeros(1, n + 1, dtype=torch.float64)
    x[0, 0] = float(probe.init_noise_sigma)
    points = [x]
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    for k, t in enumerate(probe.timesteps):
        a, s = probe._alphas[k], probe._sigmas_f[k]
        # x̂0 = p x + q m for this prediction type: pick m so that x̂0 is the unit vector of coordinate k + 1
        p = float(probe.convert_output(zero, one, a, s)[1])
        q = float(probe.convert_output(one, zero, a, s)[1])
        unit = torch.zeros(1, n + 1, dtype=torch.float64)
        unit[0, k + 1] = 1.0
        x = probe.step((unit - p * x) / q, t, x).prev_sample
        points.append(x)
    c = torch.cat(points)
    rows = []
    for i in range(n):
        a = float(c[i + 1, 0] / c[i, 0])
        rows.append([a] + [float(c[i + 1, k + 1] - a * c[i, k + 1]) for k in range(i + 1)])
    return rows
