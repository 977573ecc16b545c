"""``DCSolverScheduler``: UniPC with dynamic compensation (DC-Solver, Zhao et al. ECCV 2024) as a diffusers scheduler.

The UniP/UniC coefficients come from :mod:`samplers.unipc` (float64, once per ``set_timesteps``), the compensation
weights from :mod:`samplers.dc`, the grids and noise schedules from :mod:`samplers.grids` / :mod:`samplers.schedules`.
The diffusers contract (``from_config`` of VP and flow configs, custom ``timesteps``/``sigmas``/``mu``, begin index,
``add_noise``/``scale_noise``) is inherited from :class:`~samplers.DEISScheduler`; only the plan and ``step`` differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .cpr import CascadePolynomialRegression
from .dc import compensation_weights
from .scheduling_deis import DEISScheduler, DEISSchedulerOutput
from .unipc import SOLVER_TYPES, unic_coefficients, unip_coefficients

__all__ = ["DCSolverScheduler"]

# diffusers' pipeline loader looks the loadable base classes up in the module that defines a component's class:
# without these names here, a pipeline saved with a DCSolverScheduler cannot be loaded again.
_LOADABLE_BASES = (ConfigMixin, SchedulerMixin)
logger = logging.getLogger(__name__)
DC_VARIABLES = ("t", "lambda")
# solver_type values of DPM-Solver / DEIS configs; diffusers' UniPC reads them as bh2, and so does DC-Solver
FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "logrho")


@dataclass
class _DCPlan:
    """Per-evaluation coefficients (float64 → Python floats) for a run that starts at ``start``."""

    timesteps: np.ndarray
    rhos: np.ndarray
    sigmas: np.ndarray
    alphas: list[float]
    sigmas_f: list[float]
    start: int
    predictor: list[tuple[float, list[float]]] = field(default_factory=list)
    corrector: list[tuple[float, list[float]] | None] = field(default_factory=list)
    dc_nodes: list[list[float] | None] = field(default_factory=list)


class DCSolverScheduler(DEISScheduler):
    """DC-Solver (Zhao et al. 2024): UniPC predictor-corrector with dynamic compensation, for VP and flow models.

    ``pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios=[...])``. Schedule and grid
    arguments are those of :class:`~samplers.DEISScheduler` (default grid: uniform in ``t``, the official LDM port's
    ``time_uniform``). The solver options are:

    Args:
        solver_order (`int`, defaults to 2): UniP order 1-3 (UniC raises it by one). 2 for guided sampling.
        solver_type (`str`, defaults to `"bh2"`): ``B(h)`` of UniPC: `"bh1"` (``B = h``) or `"bh2"` (``e^h - 1``).
        corrector (`bool`, defaults to `True`): UniC after each predictor; `False` gives the predictor-only multistep
            solver (UniP-2/bh2 is DPM-Solver++(2M)) with the same compensation (DC-Solver Sec. 4.4).
        disable_corrector (`list[int]`): step indices whose corrector is skipped (DC-Solver uses ``[0]``).
        lower_order_final (`bool`, defaults to `True`): order ``≤`` steps left, as diffusers' UniPC.
        dc_order (`int`, defaults to 2): degree K of the compensation polynomial (K+1 outputs, 1-3).
        dc_ratios (`list[float]`, *optional*): ``ρ_i`` per step, ``τ_i = t_{i-1} + ρ_i (t_i - t_{i-1})``
            (DC-Solver Eq. 10); all 1 (or `None`) is plain UniPC. Length must equal ``num_inference_steps``.
        dc_variable (`str`, defaults to `"t"`): interpolate in the model timestep `"t"` (paper) or logSNR `"lambda"`.
        cpr (`dict`, *optional*): cascade-polynomial-regression coefficients
            (:meth:`CascadePolynomialRegression.to_dict`), used for the ratios when `dc_ratios` is `None`, with
            ``cpr_guidance_scale`` (the pipeline's CFG) and ``cpr_extrapolate``.

    Every grid ends with a step to σ = 0 exactly: that predictor returns the (compensated) ``x̂0``, so ``bh1`` and
    order 3 stay finite there.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        snr_shift_scale: float = 1.0,
        timestep_type: str = "discrete",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        searched_timesteps: list[float] | None = None,
        fitted_coefficients: list[list[float]] | None = None,
        fitted_timesteps: list[float] | None = None,
        time_grid: str = "time",
        time_grid_power: float | None = 1.0,
        solver_order: int = 2,
        solver_type: str = "bh2",
        corrector: bool = True,
        disable_corrector: Sequence[int] = (),
        lower_order_final: bool = True,
        dc_order: int = 2,
        dc_ratios: Sequence[float] | None = None,
        dc_variable: str = "t",
        cpr: dict | None = None,
        cpr_guidance_scale: float | None = None,
        cpr_extrapolate: bool = False,
    ) -> None:
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be one of [1, 2, 3], got {solver_order!r}")
        if solver_type in FOREIGN_SOLVER_TYPES:
            logger.info("solver_type=%r is a DPM-Solver/DEIS option; DC-Solver uses 'bh2' instead", solver_type)
            self.register_to_config(solver_type="bh2")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES} (or {FOREIGN_SOLVER_TYPES}, read as 'bh2'), "
                             f"got {solver_type!r}")
        if isinstance(disable_corrector, (str, bytes)) or not isinstance(disable_corrector, Sequence | np.ndarray):
            raise TypeError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in disable_corrector):
            raise ValueError(f"disable_corrector must hold integers >= 0, got {list(disable_corrector)!r}")
        if not isinstance(disable_corrector, list):  # a tuple would come back from JSON as a list
            self.register_to_config(disable_corrector=[int(i) for i in disable_corrector])
        if isinstance(dc_order, bool) or dc_order not in (1, 2, 3):
            raise ValueError(f"dc_order must be one of [1, 2, 3], got {dc_order!r}")
        if dc_variable not in DC_VARIABLES:
            raise ValueError(f"dc_variable must be one of {DC_VARIABLES}, got {dc_variable!r}")
        _check_ratios(dc_ratios, None)
        if cpr is not None:
            CascadePolynomialRegression.from_dict(cpr)  # validates
        self._init_schedule()
        self.order = 1
        self._plan: _DCPlan | None = None
        self._ratios: list[float] = []
        self._reset_state()

    # ----------------------------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._history: list[torch.Tensor] = []  # x̂0, newest first (compensated entries replace the original)
        self._last_sample: torch.Tensor | None = None
        self._fit_x0s: list[torch.Tensor] = []

    def state(self) -> tuple:
        """A snapshot of the multistep state (for :func:`samplers.search_dc_ratios`); tensors are never mutated."""
        return self._step_index, list(self._history), self._last_sample

    def load_state(self, state: tuple) -> None:
        self._step_index, history, self._last_sample = state
        self._history = list(history)

    def set_dc_ratios(self, ratios: Sequence[float] | None) -> None:
        """Set ``dc_ratios`` in the config (saved with ``save_pretrained``) and in the current plan."""
        _check_ratios(ratios, self.num_inference_steps)
        self.register_to_config(dc_ratios=None if ratios is None else [float(r) for r in ratios])
        if self.num_inference_steps is not None:
            self._ratios = self._resolve_ratios(self.num_inference_steps)

    @property
    def dc_ratios(self) -> list[float]:
        """The ratios in use for the current ``set_timesteps`` (ones where no compensation applies)."""
        return list(self._ratios)

    def _resolve_ratios(self, n: int) -> list[float]:
        cfg = self.config
        if cfg.dc_ratios is not None:
            _check_ratios(cfg.dc_ratios, n)
            return [float(r) for r in cfg.dc_ratios]
        if cfg.cpr is not None:
            if cfg.cpr_guidance_scale is None:
                raise ValueError("cpr needs cpr_guidance_scale (the pipeline's guidance scale)")
            model = CascadePolynomialRegression.from_dict(cfg.cpr)
            return model.predict(n, float(cfg.cpr_guidance_scale), extrapolate=bool(cfg.cpr_extrapolate))
        return [1.0] * n

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None) -> None:
        """As :meth:`DEISScheduler.set_timesteps`; also resolves the DC ratios for this number of steps."""
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
        self._ratios = self._resolve_ratios(self.num_inference_steps)

    # ----------------------------------------------------------------------------------------------------------------
    def _build_plan(self, start: int) -> None:
        cfg, sch = self.config, self.schedule
        nodes = self._nodes
        n = len(nodes)
        rhos = sch.rho(nodes)
        alphas, sigmas = sch.alpha_sigma(rhos)
        alphas, sigmas = np.append(alphas, 1.0), np.append(sigmas, 0.0)
        with np.errstate(divide="ignore"):
            lams = np.log(alphas) - np.log(sigmas)  # -inf at α = 0 (flow σ = 1), +inf at σ = 0
        plan = _DCPlan(nodes, rhos, sigmas[:n], [float(a) for a in alphas], [float(s) for s in sigmas], start)
        orders = []
        for k in range(n):
            if k < start:
                plan.predictor.append((0.0, []))
                plan.corrector.append(None)
                plan.dc_nodes.append(None)
                orders.append(0)
                continue
            p = min(cfg.solver_order, k - start + 1, n - k if cfg.lower_order_final else cfg.solver_order)
            p = _finite_order(lams[k::-1], p)
            orders.append(p)
            hist = [float(v) for v in lams[k::-1][:p]]
            plan.predictor.append(
                unip_coefficients(hist, float(lams[k + 1]), float(alphas[k + 1]), float(sigmas[k + 1]),
                                  float(sigmas[k]), p, _solver(cfg.solver_type, hist[0]))
            )
            corr = None
            if cfg.corrector and k > start and (k - 1) not in set(cfg.disable_corrector):
                q = orders[k - 1]
                hist_c = [float(v) for v in lams[k - 1::-1][:q]]
                corr = unic_coefficients(hist_c, float(lams[k]), float(alphas[k]), float(sigmas[k]),
                                         float(sigmas[k - 1]), q, _solver(cfg.solver_type, hist_c[0]))
            plan.corrector.append(corr)
            K = cfg.dc_order
            dcn = None
            if k - start >= K:
                use_lam = cfg.dc_variable == "lambda" and bool(np.all(np.isfinite(lams[k - K:k + 1])))
                dcn = [float(v) for v in (lams if use_lam else nodes)[k - K:k + 1][::-1]]
            plan.dc_nodes.append(dcn)
        self._plan = plan
        self._alphas = plan.alphas[:n]
        self._sigmas_f = plan.sigmas_f[:n]
        self._reset_state()

    def _check_start(self, index: int) -> None:
        n = len(self._nodes)
        if not 0 <= index < n:
            raise ValueError(f"begin index must be in [0, {n - 1}], got {index}")

    def compensates(self, index: int) -> bool:
        """Whether compensation can apply at step ``index`` (at least ``dc_order + 1`` outputs since the start)."""
        return self._plan is not None and self._plan.dc_nodes[index] is not None

    # ----------------------------------------------------------------------------------------------------------------
    def _x0(self, model_output: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
        out = model_output.to(device=x.device, dtype=x.dtype)
        return self.convert_output(out, x, self._plan.alphas[k], self._plan.sigmas_f[k])[1]

    def _corrected(self, x0: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        corr = self._plan.corrector[k]
        if corr is None or self._last_sample is None:
            return sample
        cx, w = corr
        out = cx * self._last_sample + w[0] * x0
        for c, m in zip(w[1:], self._history):
            out = out + c * m
        return out

    def correct(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What the next ``step`` does to ``sample`` before its predictor (UniC), without changing any state."""
        k = self._step_index
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(dtype)
        return self._corrected(self._x0(model_output, x, k), x, k)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        dc_ratio: float | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DEISSchedulerOutput | tuple[torch.Tensor]:
        """UniC on ``sample`` with the new output, push it, compensate (ratio ≠ 1), UniP to the next timestep.

        State is float32 (float64 for float64 samples) whatever the model dtype. ``dc_ratio`` overrides this step's
        configured ratio (used by the ratio search; it may be a tensor with grad). ``eta != 0`` raises.
        """
        if kwargs.get("eta"):
            raise ValueError(f"DC-Solver is a deterministic ODE solver: eta must be 0, got {kwargs['eta']}")
        if self._plan is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self._nodes):
            raise ValueError(f"step called {k + 1} times but there are only {len(self._nodes)} timesteps")
        if self._fitted is not None:
            return self._table_step(model_output, sample, k, return_dict)
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(dtype)
        x0 = self._x0(model_output, x, k)
        x = self._corrected(x0, x, k)
        history = [x0] + self._history
        ratio = self._ratios[k] if dc_ratio is None else dc_ratio
        nodes = self._plan.dc_nodes[k]
        if nodes is not None and not (isinstance(ratio, (int, float)) and ratio == 1.0):
            weights = compensation_weights(nodes, ratio)
            comp = weights[0] * history[0]
            for w, m in zip(weights[1:], history[1:]):
                comp = comp + w * m
            history[0] = comp
        del history[max(self.config.solver_order, self.config.dc_order + 1):]
        cx, w = self._plan.predictor[k]
        prev = cx * x if cx != 0 else torch.zeros_like(x)
        for c, m in zip(w, history):
            if c != 0:
                prev = prev + c * m
        self._history = history
        self._last_sample = x
        self._step_index = k + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return DEISSchedulerOutput(prev_sample=prev, pred_original_sample=history[0].to(sample.dtype))


def _finite_order(lams_newest_first: np.ndarray, order: int) -> int:
    """The order capped at the number of history points with finite ``λ``: a flow model's first point (``σ = 1``,
    ``λ = -∞``) cannot enter a polynomial in ``λ``; at order 2 its term vanishes on its own,
    at order 3 it gives NaN."""
    finite = np.isfinite(lams_newest_first[:order])
    return max(1, int(np.argmin(finite)) if not finite.all() else order)


def _solver(solver_type: str, lam_s0: float) -> str:
    """``bh1`` has ``B = h = ∞`` on a step from ``α = 0`` (flow ``σ = 1``); ``bh2`` (``B = -1`` there) is its limit."""
    return solver_type if math.isfinite(lam_s0) else "bh2"


def _check_ratios(ratios: Sequence[float] | None, n: int | None) -> None:
    if ratios is None:
        return
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence | np.ndarray):
        raise ValueError(f"dc_ratios must be None or a list of floats, got {type(ratios).__name__}")
    vals = [float(r) for r in ratios]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"dc_ratios must be finite, got {vals}")
    if n is not None and len(vals) != n:
        raise ValueError(f"dc_ratios has {len(vals)} values but num_inference_steps is {n}: give one ratio per step")
