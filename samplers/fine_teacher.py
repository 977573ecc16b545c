"""One fine DDIM solve whose state can be read at any timestep: the teacher shared by every schedule of a fit.

A teacher per schedule (:func:`samplers.ddim_reference`) costs ``fine_steps`` evaluations each time a node moves,
which made a node search (``fit_coefficients(node_rounds=...)``) cost a full solve per trial. Here the solve runs
once, on a grid uniform in ``log ρ`` from ``t0``; the state at a node ``t`` between grid points ``t_j > t >= t_{j+1}``
is one DDIM step of width ``< h`` from ``t_j`` (DDIM: Song et al., ICLR 2021, Eq. 12), so every schedule meets the
same trajectory and the same final sample, and a moved node costs one evaluation. Its local error is
``O(h²)``, below the ``O(h)`` global error of the solve itself.

Memory: the states and model outputs at the grid points are kept while they fit in ``memory_bytes``; beyond that only
every ``stride``-th state is kept and a node's state is recomputed from the one above (``<= stride`` evaluations).
Recomputed node states are then remembered, as many as a quarter of ``memory_bytes`` holds: a pattern search moves
one node at a time and asks for the others again.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule_search import Denoise, _convert, _fine_grid

__all__ = ["FineTeacher"]


class FineTeacher:
    """A ``steps``-evaluation DDIM solve of ``denoise`` from ``latents`` at ``t0`` down to ``σ = 0`` (module
    docstring). ``convert``: a prediction type, or a scheduler's ``convert_output(out, x, α, σ) -> (ε, x̂0)`` (its
    thresholding included). ``state(t)``: the teacher state at ``t0 >= t >= 0`` (float64); ``final``: the last
    sample; ``evaluations``: model calls so far (per latent)."""

    @torch.no_grad()
    def __init__(self, denoise: Denoise, schedule: Any, convert: str | Callable, latents: torch.Tensor, t0: float,
                 steps: int = 250, memory_bytes: int = 2 ** 30, progress: bool = False) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 1:
            raise ValueError(f"memory_bytes must be an int >= 1, got {memory_bytes!r}")
        if isinstance(convert, str):
            convert = functools.partial(_convert, convert)
        self._denoise, self._sch, self._convert, self._dtype = denoise, schedule, convert, latents.dtype
        # steps - 1 points below t0 (the last at t_min), then one step from t_min to σ = 0
        self.grid = _fine_grid(schedule, float(t0), steps - 1, False)
        per_state = latents.numel() * 8
        keep_outputs = 2 * len(self.grid) * per_state <= memory_bytes
        self.stride = 1 if keep_outputs else max(1, math.ceil(len(self.grid) * per_state / memory_bytes))
        self._kept: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # the model output at a kept point: a node below it needs no call
        self._memo: OrderedDict[float, torch.Tensor] = OrderedDict()  # least recently used first
        self._memo_size = 0 if keep_outputs else memory_bytes // (4 * per_state)
        self.evaluations = 0
        x = latents.to(torch.float64)
        for j in tqdm(range(len(self.grid)), desc="fine teacher", disable=not progress):
            out = self._eval(x, j)
            if j % self.stride == 0:
                self._kept[j] = x.clone()
                if keep_outputs:
                    self._outputs[j] = out
            x = self._step(x, out, j, self._rho_next(j))
        self.final = x

    def _eval(self, x: torch.Tensor, j: int) -> torch.Tensor:
        self.evaluations += 1
        t = torch.tensor(float(self.grid[j]), dtype=torch.float64)
        return self._denoise(x.to(self._dtype), t).to(torch.float64)

    def _rho(self, j: int) -> float:
        return float(self._sch.rho(float(self.grid[j])))

    def _rho_next(self, j: int) -> float:
        return self._rho(j + 1) if j + 1 < len(self.grid) else 0.0

    def _step(self, x: torch.Tensor, out: torch.Tensor, j: int, rho_to: float) -> torch.Tensor:
        """One DDIM step from grid point ``j`` (model output ``out``) to ``ρ = rho_to``; from ``σ = 1`` (flow, ``ρ``
        infinite) the output alone gives the clean estimate."""
        a, s = (float(v) for v in self._sch.alpha_sigma(self._rho(j)))
        eps, x0 = self._convert(out, x, a, s)
        a2, s2 = (float(v) for v in self._sch.alpha_sigma(rho_to))
        return a2 * x0 + s2 * eps

    def _state_at(self, j: int) -> torch.Tensor:
        """The state at grid point ``j``, from the kept state at or above it."""
        c = j - j % self.stride
        x = self._kept[c]
        for i in range(c, j):
            x = self._step(x, self._eval(x, i), i, self._rho(i + 1))
        return x

    @torch.no_grad()
    def state(self, t: float) -> torch.Tensor:
        t = float(t)
        if t in self._memo:
            self._memo.move_to_end(t)
            return self._memo[t]
        if not math.isfinite(t) or not 0 <= t <= float(self.grid[0]):
            raise ValueError(f"t must be in [0, {float(self.grid[0])}] (the teacher starts at t0), got {t!r}")
        # the last grid point at or above t (the grid falls)
        j = int(np.searchsorted(-self.grid, -t, side="right")) - 1
        x = self._state_at(j)
        if float(self.grid[j]) != t:
            out = self._outputs[j] if j in self._outputs else self._eval(x, j)
            x = self._step(x, out, j, float(self._sch.rho(t)))
        if self._memo_size:
            self._memo[t] = x
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return x
