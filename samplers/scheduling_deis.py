"""``DEISScheduler``: the paper's DEIS (tAB, ρAB, ρRK, iPNDM) as a drop-in diffusers scheduler.

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023. The math is in
:mod:`samplers.deis` (plans computed once per ``set_timesteps`` in float64). This class only converts model outputs to
``(ε, x̂0)`` and applies the plan's linear combinations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .deis import RK_TABLEAUX, Plan, multistep_plan, order_range, rk_plan
from .grids import (
    TIME_GRIDS,
    TIMESTEP_SPACINGS,
    beta_grid,
    flow_shift,
    log_rho_grid,
    power_grid,
    rho_power_grid,
    spacing_timesteps,
)
from .linear_solver import check_table, table_update
from .schedules import (
    EDMSchedule,
    FlowSchedule,
    NoiseSchedule,
    VPSchedule,
    alphas_cumprod_from_config,
    betas_from_config,
)
from .thresholding import dynamic_threshold

__all__ = ["DEISScheduler", "DEISSchedulerOutput"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
TIME_SHIFT_TYPES = ("exponential", "linear")
TIMESTEP_TYPES = ("discrete", "continuous")
DEFAULT_GRID_POWER = {"time": 1.5, "rho": 7.0}
SIGMA_GRID_FLAGS = {"use_karras_sigmas": "rho", "use_exponential_sigmas": "log_rho", "use_beta_sigmas": "beta"}
OWN_CLASSES = ("DEISScheduler", "DCSolverScheduler")


@dataclass
class DEISSchedulerOutput(SchedulerOutput):
    """``prev_sample`` (next model input, or the final sample) and ``pred_original_sample`` (this step's ``x̂0``)."""

    pred_original_sample: torch.Tensor | None = None


def _is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a *foreign* config (another scheduler's) describes a rectified-flow model."""
    name = str(config.get("_class_name") or "")
    if name in OWN_CLASSES:
        return config.get("prediction_type") == "flow_prediction"
    return (
        name.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
        or (not name and "shift" in config and "beta_schedule" not in config)
    )


class DEISScheduler(SchedulerMixin, ConfigMixin):
    """DEIS sampler (Zhang & Chen 2023) for VP (DDPM/SD/SDXL/PixArt/DiT) and rectified-flow (SD3/Flux) models.

    ``pipe.scheduler = DEISScheduler.from_config(pipe.scheduler.config)``. ``FlowMatch*`` configs select
    ``prediction_type="flow_prediction"``. The schedule arguments mirror diffusers'; the DEIS options are:

    Args:
        deis_method (`str`, defaults to `"tab"`):
            `"tab"` (tAB-DEIS, ε polynomial in t), `"rhoab"` (polynomial in ρ), `"rhork"` (Runge-Kutta in ρ,
            ``order`` stages per step), `"ipndm"` (fixed Adams-Bashforth weights).
        deis_order (`int`, defaults to `3`):
            Polynomial degree r (0..3, r+1 points; 0 is DDIM) for the multistep methods; RK order 1..4 (Euler, Heun,
            Kutta-3, RK4) for `"rhork"`.
        time_grid (`str`, defaults to `"time"`):
            `"time"`: power law in t, `t_i = t_max (1 - i/N)^κ` (flow: in σ before the shift); `"rho"`: power law in
            ρ = σ/α between the model's extreme noise levels (κ = 7 is Karras); `"log_rho"`: uniform log ρ
            (uniform logSNR); `"spacing"`: diffusers' `timestep_spacing` (flow: FlowMatchEulerDiscreteScheduler's).
        time_grid_power (`float`, *optional*):
            κ of the power-law grids; defaults to 1.5 for `"time"` and 7 for `"rho"`.
        deis_lower_order (`bool`, defaults to `True`):
            Lower degrees at few steps (≤ 1 below 8 steps, ≤ 2 below 15). Multistep methods only.

    Shared with :class:`~samplers.DCSolverScheduler` (diffusers' names and meaning): ``use_karras_sigmas`` /
    ``use_exponential_sigmas`` / ``use_beta_sigmas`` select the ``"rho"`` (κ = 7) / ``"log_rho"`` / ``"beta"`` grid,
    bounded by ``sigma_min``/``sigma_max`` (ρ = σ/α; flow: σ); ``thresholding`` with ``dynamic_thresholding_ratio``
    and ``sample_max_value`` is Imagen's dynamic thresholding of x̂0; ``searched_timesteps`` is a schedule from
    :func:`samplers.search_schedule`, used by ``set_timesteps`` for its own number of steps;
    ``fitted_coefficients`` with ``fitted_timesteps`` is a solver fitted to a model by
    :func:`samplers.fit_coefficients` (:mod:`samplers.linear_solver`, Eq. 1), used instead of the solver's own
    update whenever a run starts at the first of exactly those timesteps; ``snr_shift_scale`` is
    CogVideoX's SNR shift of ``ᾱ`` (:func:`samplers.schedules.alphas_cumprod_from_config`); ``timestep_type=
    "continuous"`` with v-prediction is EDM's ``c_noise = ln(σ)/4`` on ``[sigma_min, sigma_max]`` as diffusers' Euler
    has it (Stable Video Diffusion; :class:`~samplers.schedules.EDMSchedule`).

    Every grid ends with a step to σ = 0 exactly. ``num_inference_steps`` counts steps: one model evaluation each for
    the multistep methods, ``deis_order`` stages for `"rhork"` (``self.order``; RK4's last step has 3).

    The defaults (tAB, degree 3 capped by ``deis_lower_order``, ``t_i = 999 (1 - i/N)^1.5``) were picked on
    Gaussian-mixture problems with an exact reference (4 mixtures x {uncond, CFG 2, 4, 8}, NFE 3-20) against 23
    diffusers scheduler/grid pairs; ``scripts/bench_samplers.py`` reruns the comparison.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1

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
        deis_method: str = "tab",
        deis_order: int = 3,
        time_grid: str = "time",
        time_grid_power: float | None = None,
        deis_lower_order: bool = True,
    ) -> None:
        allowed = order_range(deis_method)  # validates deis_method
        if isinstance(deis_order, bool) or deis_order not in allowed:
            raise ValueError(
                f"deis_order for deis_method={deis_method!r} must be one of {list(allowed)}, got {deis_order!r}"
            )
        self._init_schedule()
        self.order = len(RK_TABLEAUX[deis_order].c) if deis_method == "rhork" else 1
        self._plan: Plan | None = None
        self._reset_state()

    def _init_schedule(self) -> None:
        """Validate the schedule, grid and output options shared with :class:`~samplers.DCSolverScheduler` (read
        from ``self.config``), and build the noise schedule and the state before the first ``set_timesteps``."""
        cfg = self.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}")
        if cfg.use_flow_sigmas and cfg.prediction_type != "flow_prediction":
            # diffusers' DPM-Solver reads such configs as flow; stored here they would change meaning on reload
            raise ValueError(f"use_flow_sigmas=True needs prediction_type='flow_prediction', got "
                             f"{cfg.prediction_type!r} (a VP model takes use_flow_sigmas=False)")
        if cfg.time_grid not in TIME_GRIDS:
            raise ValueError(f"time_grid must be one of {TIME_GRIDS}, got {cfg.time_grid!r}")
        power = cfg.time_grid_power
        if power is not None and (isinstance(power, bool) or not isinstance(power, (int, float))
                                  or not math.isfinite(power) or power <= 0):
            raise ValueError(f"time_grid_power must be None or a finite number > 0, got {power!r}")
        if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {cfg.timestep_spacing!r}")
        if cfg.timestep_type not in TIMESTEP_TYPES:
            raise ValueError(f"timestep_type must be one of {TIMESTEP_TYPES}, got {cfg.timestep_type!r}")
        if self.is_edm and cfg.time_grid == "spacing" and not any(cfg.get(k) for k in SIGMA_GRID_FLAGS):
            raise ValueError("time_grid='spacing' spaces discrete train timesteps; continuous (EDM) timesteps take "
                             "the 'time', 'rho', 'log_rho' or 'beta' grid")
        if cfg.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {cfg.time_shift_type!r}")
        flags = [k for k in SIGMA_GRID_FLAGS if cfg.get(k)]
        if len(flags) > 1:
            raise ValueError(f"at most one of {list(SIGMA_GRID_FLAGS)} may be True, got {flags}")
        if not 0 < cfg.dynamic_thresholding_ratio < 1:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1), got {cfg.dynamic_thresholding_ratio!r}")
        if not cfg.sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {cfg.sample_max_value!r}")
        if cfg.prediction_type == "flow_prediction":
            if cfg.trained_betas is not None or cfg.rescale_betas_zero_snr or cfg.snr_shift_scale != 1:
                raise ValueError("trained_betas and rescale_betas_zero_snr describe a VP schedule (as does "
                                 f"snr_shift_scale, here {cfg.snr_shift_scale!r}); "
                                 "prediction_type='flow_prediction' uses σ = t/T (leave them unset)")
            self.schedule: NoiseSchedule = FlowSchedule(cfg.num_train_timesteps)
            self.betas = None
            self.alphas_cumprod = None
        else:
            s = cfg.snr_shift_scale
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
                raise ValueError(f"snr_shift_scale must be a finite number > 0, got {s!r}")
            args = (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas,
                    cfg.rescale_betas_zero_snr, float(s))
            self.betas = betas_from_config(*args)
            ac = alphas_cumprod_from_config(*args)
            self.schedule = VPSchedule(ac)
            if self.is_edm:  # as diffusers' Euler: σ from sigma_min/max, else the alphas_cumprod range
                vp = self.schedule
                lo = float(vp.rho(0.0)) if cfg.sigma_min is None else float(cfg.sigma_min)
                hi = float(vp.rho(vp.t_max)) if cfg.sigma_max is None else float(cfg.sigma_max)
                self.schedule = EDMSchedule(lo, hi, cfg.num_train_timesteps)
            self.alphas_cumprod = torch.from_numpy(ac).float()
        self._check_sigma_bounds()
        if cfg.searched_timesteps is not None:
            self._user_timesteps(cfg.searched_timesteps)  # validates
        check_table(cfg.fitted_coefficients, cfg.fitted_timesteps)
        if cfg.fitted_coefficients is not None and cfg.get("deis_method") == "rhork":
            raise ValueError("fitted_coefficients need one model evaluation per step; deis_method='rhork' has "
                             "several (use 'tab', 'rhoab' or 'ipndm')")
        self._fitted: list[list[float]] | None = None
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        T, sch = self.schedule.num_train_timesteps, self.schedule
        ts = np.linspace(sch.t_max, sch.t_min, T) if self.is_edm else np.arange(T)[::-1]  # before set_timesteps
        self.timesteps = torch.from_numpy(ts.astype(np.float32))
        self.sigmas = torch.from_numpy(self.schedule.rho(self.timesteps.double().numpy()).astype(np.float32))
        self._begin_index: int | None = None

    def _grid_kind(self) -> tuple[str, float]:
        """The grid in use and its power: ``use_karras_sigmas`` etc. (diffusers' flags) override ``time_grid``."""
        cfg = self.config
        for flag, grid in SIGMA_GRID_FLAGS.items():
            if cfg.get(flag):
                return grid, 7.0
        return cfg.time_grid, float(cfg.time_grid_power or DEFAULT_GRID_POWER.get(cfg.time_grid, 1.0))

    def _check_sigma_bounds(self) -> None:
        cfg = self.config
        if (cfg.sigma_min is None and cfg.sigma_max is None) or self.is_edm:  # EDM: they define the schedule
            return
        if self._grid_kind()[0] not in ("rho", "log_rho", "beta"):
            raise ValueError("sigma_min/sigma_max bound the 'rho', 'log_rho' and 'beta' grids (or use_karras_sigmas, "
                             f"use_exponential_sigmas, use_beta_sigmas); time_grid={cfg.time_grid!r} has no σ range")
        sch = self.schedule
        lo, hi = (0.0, 1.0) if self.is_flow else (float(sch.rho(sch.t_min)), float(sch.rho(sch.t_max)))
        for name in ("sigma_min", "sigma_max"):
            v = cfg.get(name)
            if v is not None and not (isinstance(v, (int, float)) and lo * (1 - 1e-6) <= v <= hi * (1 + 1e-6)
                                      and (not self.is_flow or 0 < v < 1)):
                unit = "flow σ in (0, 1)" if self.is_flow else f"ρ = σ/α in [{lo:.6g}, {hi:.6g}]"
                raise ValueError(f"{name} must be None or a {unit}, got {v!r}")
        if cfg.sigma_min is not None and cfg.sigma_max is not None and not cfg.sigma_min < cfg.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {cfg.sigma_min!r} >= {cfg.sigma_max!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``from_config``; a ``FlowMatch*`` (or flow-sigmas) config selects ``flow_prediction``."""
        if isinstance(config, Mapping) and "prediction_type" not in kwargs and _is_flow_config(config):
            kwargs["prediction_type"] = "flow_prediction"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def register_to_config(self, **kwargs: Any) -> None:
        """diffusers' ``register_to_config``; a key set after ``__init__`` (a searched schedule, DC ratios, a solver
        variant) also leaves ``_use_default_values``, else ``from_config(self.config)`` would drop it in memory
        (``save_pretrained`` does not write that list, so only the in-memory copy lost it)."""
        super().register_to_config(**kwargs)
        used = self._internal_dict.get("_use_default_values")
        if "_use_default_values" not in kwargs and used and any(k in used for k in kwargs):
            super().register_to_config(_use_default_values=[k for k in used if k not in kwargs])

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        return self.schedule.kind == "flow"

    @property
    def is_edm(self) -> bool:
        """Continuous EDM timesteps ``ln(σ)/4`` (diffusers' Euler ``timestep_type="continuous"`` with v-prediction:
        Stable Video Diffusion), see :class:`~samplers.schedules.EDMSchedule`."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @property
    def step_index(self) -> int | None:
        """Index of the next evaluation (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First evaluation index, set by the pipeline with ``set_begin_index`` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at evaluation ``begin_index`` (img2img): the multistep warm-up restarts there."""
        self._begin_index = int(begin_index)
        if self._plan is not None:
            self._check_start(self._begin_index)
            self._build_plan(self._begin_index)
            if self._begin_index != 0:  # a fitted table starts from x_T (see _init_step_index)
                self._fitted = None

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._anchor: torch.Tensor | None = None
        self._fit_x0s: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.schedule.num_train_timesteps

    # ----------------------------------------------------------------------------------------------------------------
    def _flow_scale(self, mu: float | None) -> float:
        """The ρ multiplier of the flow shift: ``shift`` (or ``flow_shift``), ``e^μ`` or ``μ`` when dynamic."""
        cfg = self.config
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed to set_timesteps when use_dynamic_shifting is True")
            return math.exp(mu) if cfg.time_shift_type == "exponential" else float(mu)
        return float(cfg.flow_shift if cfg.use_flow_sigmas else cfg.shift)

    def _flow_sigmas_to_t(self, sigmas: np.ndarray) -> np.ndarray:
        if self.config.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.config.shift_terminal))
        return sigmas * self.config.num_train_timesteps

    def _grid_timesteps(self, n: int, mu: float | None) -> np.ndarray:
        cfg, sch = self.config, self.schedule
        grid, kappa = self._grid_kind()
        if self.is_flow:
            T = cfg.num_train_timesteps
            m = self._flow_scale(mu)
            if grid == "time":
                return self._flow_sigmas_to_t(flow_shift(power_grid(1.0, 0.0, n, kappa), m))
            if grid == "spacing":  # FlowMatchEulerDiscreteScheduler.set_timesteps
                sigma_min = 1 / T if cfg.use_dynamic_shifting else float(flow_shift(1 / T, m))
                return self._flow_sigmas_to_t(flow_shift(np.linspace(1.0, sigma_min, n), m))
            rho_max, rho_min = m * (T - 1), m / (T - 1)  # ρ at σ = (T-1)/T and 1/T, shifted
            if cfg.sigma_max is not None:
                rho_max = cfg.sigma_max / (1 - cfg.sigma_max)
            if cfg.sigma_min is not None:
                rho_min = cfg.sigma_min / (1 - cfg.sigma_min)
        else:
            if grid == "time":
                return power_grid(sch.t_max, sch.t_min, n, kappa)
            if grid == "spacing":
                return spacing_timesteps(n, sch.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset)
            rho_max = float(sch.rho(sch.t_max)) if cfg.sigma_max is None else float(cfg.sigma_max)
            rho_min = float(sch.rho(sch.t_min)) if cfg.sigma_min is None else float(cfg.sigma_min)
        if grid == "rho":
            rhos = rho_power_grid(rho_max, rho_min, n, kappa)
        elif grid == "beta":
            rhos = beta_grid(rho_max, rho_min, n)
        else:
            rhos = log_rho_grid(rho_max, rho_min, n)
        return sch.t_of_rho(rhos)

    def _user_timesteps(self, timesteps: Any) -> np.ndarray:
        ts = np.asarray(torch.as_tensor(timesteps).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
        lo, hi = (self.schedule.t_min, self.schedule.t_max)
        if ts.size == 0 or not np.all(np.isfinite(ts)) or np.any(ts < lo) or np.any(ts > hi):
            raise ValueError(f"timesteps must be finite values in [{lo:g}, {hi:g}], got {ts.tolist()}")
        if self.is_flow and np.any(ts <= 0):
            raise ValueError("flow timesteps must be > 0 (the final step to σ = 0 is appended)")
        return ts

    def _user_sigmas(self, sigmas: Any, mu: float | None) -> np.ndarray:
        s = np.asarray(torch.as_tensor(sigmas).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
        if s.size > 1 and s[-1] == 0:
            s = s[:-1]  # a trailing terminal 0 is implied
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"sigmas must be finite and > 0 (a final 0 is appended), got {s.tolist()}")
        if self.is_flow:  # σ in (0, 1], shifted like FlowMatchEulerDiscreteScheduler does
            if np.any(s > 1):
                raise ValueError(f"flow sigmas must lie in (0, 1], got {s.tolist()}")
            return self._flow_sigmas_to_t(flow_shift(s, self._flow_scale(mu)))
        rho_lo, rho_hi = float(self.schedule.rho(self.schedule.t_min)), float(self.schedule.rho(self.schedule.t_max))
        if np.any(s < rho_lo * (1 - 1e-6)) or np.any(s > rho_hi * (1 + 1e-6)):
            raise ValueError(f"sigmas (ρ = σ/α) must lie in [{rho_lo:.6g}, {rho_hi:.6g}] for this schedule")
        return self.schedule.t_of_rho(np.clip(s, rho_lo, rho_hi))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid and the DEIS plan, and reset all state.

        Args:
            num_inference_steps: number of steps (``len(timesteps)``/``len(sigmas)`` when those are given).
            device: where ``self.timesteps`` lives.
            timesteps: custom model timesteps of the steps, decreasing (VP: ``[0, T-1]``; flow: ``(0, T]``).
            sigmas: custom noise levels: ρ = σ/α for VP (diffusers' Euler/DPM ``sigmas``), σ ∈ (0, 1] for flow
                (shifted by ``shift``/``mu`` as in FlowMatchEulerDiscreteScheduler). Exclusive with ``timesteps``.
            mu: flow dynamic shift (Flux), required when ``use_dynamic_shifting``; ignored otherwise.
        """
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass at most one of `timesteps` and `sigmas`")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("pass num_inference_steps, timesteps or sigmas")
        if timesteps is not None:
            nodes = self._user_timesteps(timesteps)
        elif sigmas is not None:
            nodes = self._user_sigmas(sigmas, mu)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            nodes = self._searched(int(num_inference_steps))
            if nodes is None:
                nodes = self._grid_timesteps(int(num_inference_steps), mu)
        if num_inference_steps is not None and len(nodes) != num_inference_steps:
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(nodes)} timesteps/sigmas were given")
        nodes = nodes.astype(np.float32).astype(np.float64)  # what the model receives, so that ρ matches it exactly
        if np.any(np.diff(nodes) >= 0):
            raise ValueError(f"timesteps must be strictly decreasing, got {nodes.tolist()}")
        self._nodes = nodes
        self.num_inference_steps = len(nodes)
        self._begin_index = None
        self._build_plan(0)
        self._fitted = self._fitted_rows()
        ts = self._plan.timesteps
        if not self.is_flow and np.all(ts == np.round(ts)):
            self.timesteps = torch.from_numpy(ts.astype(np.int64)).to(device)
        else:
            self.timesteps = torch.from_numpy(ts.astype(np.float32)).to(device)
        level = self._plan.sigmas if self.is_flow else self._plan.rhos
        self.sigmas = torch.from_numpy(np.append(level, 0.0).astype(np.float32))

    def _fitted_rows(self) -> list[list[float]] | None:
        """The fitted table of the config when it was fitted on exactly the current timesteps, else ``None``."""
        cfg = self.config
        if cfg.fitted_coefficients is None:
            return None
        fitted = np.asarray(cfg.fitted_timesteps, dtype=np.float64).astype(np.float32)
        if fitted.shape != self._nodes.shape or not np.array_equal(fitted, self._nodes.astype(np.float32)):
            return None
        return [[float(v) for v in row] for row in cfg.fitted_coefficients]

    def _searched(self, n: int) -> np.ndarray | None:
        """The searched schedule of the config (:func:`samplers.search_schedule`) when it has ``n`` steps."""
        ts = self.config.searched_timesteps
        if ts is None or len(ts) != n:
            return None
        return self._user_timesteps(ts)

    def set_searched_timesteps(self, timesteps: list[float] | None) -> None:
        """Store a searched schedule in the config (saved by ``save_pretrained``); ``set_timesteps(len(timesteps))``
        uses it from then on, other step counts keep the default grid. ``None`` removes it."""
        if timesteps is not None:
            timesteps = [float(t) for t in self._user_timesteps(timesteps)]
            if np.any(np.diff(timesteps) >= 0):
                raise ValueError(f"searched timesteps must be strictly decreasing, got {timesteps}")
        self.register_to_config(searched_timesteps=timesteps)

    def _build_plan(self, start: int) -> None:
        cfg = self.config
        if cfg.deis_method == "rhork":
            self._plan = rk_plan(self.schedule, self._nodes, cfg.deis_order)
        else:
            self._plan = multistep_plan(
                self.schedule, self._nodes, cfg.deis_method, cfg.deis_order, start, bool(cfg.deis_lower_order)
            )
        # Python floats once, so that step() does no host-device sync and no float64 math
        self._alphas = [float(a) for a in self._plan.alphas]
        self._sigmas_f = [float(s) for s in self._plan.sigmas]
        self._reset_state()

    def _check_start(self, index: int) -> None:
        n = len(self._plan.updates)
        if not 0 <= index < n:
            raise ValueError(f"begin index must be in [0, {n - 1}], got {index}")
        if not self._plan.updates[index].starts_step:
            raise ValueError(f"begin index {index} is an intermediate Runge-Kutta stage; use a step start")

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1)[0]
        matches = (self.timesteps.detach().to("cpu", torch.float64) == t).nonzero().flatten()
        if matches.numel() == 0:
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps")
        index = int(matches[1 if matches.numel() > 1 else 0])  # diffusers' rule: the second of duplicates
        if index != 0:
            self._fitted = None  # a fitted table is fitted from x_T; a run that starts later uses the solver's own
            self._check_start(index)
            self._build_plan(index)
        self._step_index = index

    # ----------------------------------------------------------------------------------------------------------------
    def _convert(self, out: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε, x̂0)`` from the model output at evaluation ``k``."""
        return self.convert_output(out, x, self._alphas[k], self._sigmas_f[k])

    def convert_output(
        self, out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε, x̂0)`` from a model output at noise level ``(α, σ)`` for this ``prediction_type``; with
        ``thresholding`` the ``x̂0`` is dynamically thresholded and ``ε`` made consistent with it."""
        a, s = alpha, sigma
        pred = self.config.prediction_type
        if pred == "epsilon":
            eps, x0 = out, (x - s * out) / a
        elif pred == "sample":
            eps, x0 = (x - a * out) / s, out
        elif pred == "v_prediction":  # v = α ε - σ x0, α² + σ² = 1
            eps, x0 = s * x + a * out, a * x - s * out
        else:  # flow: v = ε - x0, x = α x0 + σ ε, α = 1 - σ
            eps, x0 = x + a * out, x - s * out
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            eps = (x - a * x0) / s
        return eps, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> DEISSchedulerOutput | tuple[torch.Tensor]:
        """Advance by one model evaluation. For RK stages ``prev_sample`` is the next stage's input.

        History and arithmetic are float32 (float64 if ``sample`` is float64) whatever the model's dtype; the result
        is cast back to ``sample.dtype``. DEIS is deterministic: ``generator`` and other pipeline keywords (DDIM's
        ``eta=0``, ``use_clipped_model_output``) are accepted and ignored, but ``eta != 0`` raises.
        """
        if kwargs.get("eta"):
            raise ValueError(f"DEIS is a deterministic ODE solver: eta must be 0, got {kwargs['eta']}")
        if self._plan is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self._plan.updates):
            raise ValueError(f"step called {k + 1} times but there are only {len(self._plan.updates)} timesteps")
        if self._fitted is not None:
            return self._table_step(model_output, sample, k, return_dict)
        upd = self._plan.updates[k]
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(dtype)
        eps, x0 = self._convert(model_output.to(device=x.device, dtype=dtype), x, k)
        if upd.starts_step:
            self._anchor = x
        self._history.insert(0, (eps, x0))
        del self._history[self._plan.history :]
        prev = self._anchor * upd.anchor if upd.anchor != 0 else torch.zeros_like(x)
        for c, (e, _) in zip(upd.eps, self._history):
            if c != 0:
                prev = prev + c * e
        for c, (_, z) in zip(upd.x0, self._history):
            if c != 0:
                prev = prev + c * z
        self._step_index = k + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return DEISSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))

    def _table_step(self, model_output: torch.Tensor, sample: torch.Tensor, k: int,
                    return_dict: bool) -> DEISSchedulerOutput | tuple[torch.Tensor]:
        """One step of the fitted table (:mod:`samplers.linear_solver`, Eq. 1), in the solvers' state dtype."""
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(dtype)
        x0 = self.convert_output(model_output.to(device=x.device, dtype=dtype), x, self._alphas[k],
                                 self._sigmas_f[k])[1]
        self._fit_x0s.append(x0)
        prev = table_update(self._fitted[k], x, self._fit_x0s).to(sample.dtype)
        self._step_index = k + 1
        if not return_dict:
            return (prev,)
        return DEISSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Identity (the model sees ``x_t`` unscaled)."""
        return sample

    def _alpha_sigma_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        a, s = self.schedule.alpha_sigma(self.schedule.rho(t))
        shape = (-1,) + (1,) * (like.ndim - 1)
        to = {"device": like.device, "dtype": like.dtype}
        return torch.from_numpy(a).to(**to).reshape(shape), torch.from_numpy(s).to(**to).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = α_t x0 + σ_t ε`` at (integer or fractional) model timesteps."""
        a, s = self._alpha_sigma_at(timesteps, original_samples)
        return a * original_samples + s * noise

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flow img2img forward process ``σ ε + (1 - σ) x0`` (FlowMatch's ``scale_noise``); VP: ``add_noise``."""
        if noise is None:
            raise ValueError("scale_noise needs `noise`")
        return self.add_noise(sample, noise, timestep)
