"""``use_sampler``: swap a pipeline's scheduler for one of dmq's samplers (or a diffusers one), keeping its noise
schedule, prediction type and flow shift."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samplers import DCSolverScheduler, DEISScheduler

SAMPLERS: dict[str, type] = {"deis": DEISScheduler, "dc-solver": DCSolverScheduler}
PLANNED: tuple[str, ...] = ()  # names reserved for samplers that are not available yet
ALIASES = {"ratios": "dc_ratios"}  # use_sampler(pipe, "dc-solver", ratios=[...])
# diffusers' own schedulers, passed through: (VP class, flow-matching class or None)
PASS_THROUGH: dict[str, tuple[str, str | None]] = {
    "dpm++": ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler"),
    "unipc": ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
    "ddim": ("DDIMScheduler", None),
    "euler": ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"),
}


def sampler_names() -> list[str]:
    return sorted(SAMPLERS) + sorted(PASS_THROUGH)


def is_flow_config(config: Mapping[str, Any], class_name: str = "") -> bool:
    """A flow-matching (rectified-flow) schedule: a FlowMatch* scheduler, flow sigmas or flow prediction."""
    name = class_name or str(config.get("_class_name", ""))
    return (name.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def edm_reason(config: Mapping[str, Any]) -> str | None:
    """Why a scheduler config is one DEIS / DC-Solver cannot serve, or None. They integrate a VP schedule (discrete
    ``alphas_cumprod``, or EDM's continuous ``σ`` with ``c_noise = ln(σ)/4`` and the input scaled by
    ``1/sqrt(σ² + 1)``: Euler with ``timestep_type="continuous"``, Stable Video Diffusion) or rectified flow. EDM's
    own schedulers (Karras et al. 2022) precondition with ``sigma_data`` (input ``1/sqrt(σ² + σ_data²)``, ``c_skip``,
    ``c_out``): a model trained that way is no VP model unless ``sigma_data = 1``, and they say nothing of it."""
    if "sigma_data" in config and "sigma_schedule" in config:  # EDMEuler, EDMDPMSolver, CosineDPMSolver
        name = str(config.get("_class_name") or "the scheduler")
        return (f"{name} preconditions the model with EDM's sigma_data={config.get('sigma_data')} (c_in, c_skip, "
                "c_out), which DEIS / DC-Solver, integrating a VP or flow schedule, do not reproduce")
    return None


def _dc_inputs(options: dict) -> dict:
    """DC-Solver accepts ``ratios`` (a list), ``cpr`` (coefficients: a dict, a list of 36 floats, or the path of a
    ``scripts/search_dc.py`` JSON file) and ``guidance_scale`` (for the CPR prediction)."""
    cpr = options.get("cpr")
    if isinstance(cpr, (str, Path)):
        path = Path(cpr)
        if not path.is_file():
            raise ValueError(f"cpr file {str(cpr)!r} not found (expected the JSON written by scripts/search_dc.py)")
        d = json.loads(path.read_text())
        options["cpr"] = {k: d[k] for k in ("coefficients", "nfe_range", "guidance_range", "first_step") if k in d}
    elif cpr is not None and not isinstance(cpr, dict):
        cpr = [float(c) for c in cpr]
        options["cpr"] = {"coefficients": cpr, "nfe_range": [1, 1e9], "guidance_range": [-1e9, 1e9]}
    if "guidance_scale" in options:
        options["cpr_guidance_scale"] = float(options.pop("guidance_scale"))
    return options


def _pass_through(pipe: Any, key: str, options: dict) -> Any:
    import diffusers

    config = dict(pipe.scheduler.config)
    vp_name, flow_name = PASS_THROUGH[key]
    flow = is_flow_config(config, type(pipe.scheduler).__name__)
    if flow and flow_name is None:
        raise ValueError(f"{key!r} has no flow-matching version; for flow pipelines use one of "
                         f"{sorted(k for k, v in PASS_THROUGH.items() if v[1]) + sorted(SAMPLERS)}")
    cls = getattr(diffusers, flow_name if flow else vp_name)
    extra: dict[str, Any] = {}
    if flow and not cls.__name__.startswith("FlowMatch"):
        # diffusers' multistep solvers run rectified flow through flow sigmas with the source's shift
        extra = {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                 "flow_shift": float(config.get("shift", config.get("flow_shift", 1.0)))}
    if key == "dpm++":
        extra["algorithm_type"] = "dpmsolver++"
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {key!r} ({cls.__name__}); valid options: {sorted(allowed)}")
    scheduler = cls.from_config(config, **{**extra, **options})
    want = config.get("prediction_type")
    have = scheduler.config.get("prediction_type")
    if want is not None and have is not None and "prediction_type" not in options and have != want:
        raise ValueError(f"{key!r} cannot keep prediction_type={want!r}")
    pipe.scheduler = scheduler
    return pipe


# fit=True candidates for DEIS: (deis_method, deis_order, time_grid, time_grid_power)
DEIS_FIT_CANDIDATES = (
    ("tab", 3, "time", 1.5), ("tab", 3, "time", 2.0), ("tab", 2, "time", 1.5), ("tab", 3, "log_rho", None),
    ("tab", 3, "rho", 7.0), ("rhoab", 3, "time", 1.5), ("rhoab", 3, "log_rho", None), ("ipndm", 3, "time", 1.5),
    ("ipndm", 3, "log_rho", None), ("tab", 1, "log_rho", None),
)
FIT_OPTIONS = ("fit_steps", "fit_labels", "fit_guidance_scale", "fit_latents", "fit_seed")


def _fit_deis(pipe: Any, fit: dict) -> dict:
    """DEIS variant and grid with the lowest final-sample error against a fine reference (256 DDIM steps) on a
    few latents of ``pipe``'s backbone, at ``fit_steps`` steps and ``fit_guidance_scale``."""
    import numpy as np
    import torch

    from samplers.schedule_search import _fine_grid, fine_trajectory, run_sampler

    from .dc_search import _backbone, _null_label, guided_denoise

    steps = fit.get("fit_steps", 10)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fit_steps must be an int >= 1, got {steps!r}")
    guidance = fit.get("fit_guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"fit_guidance_scale must be a number >= 0, got {guidance!r}")
    count = fit.get("fit_latents", 8)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"fit_latents must be an int >= 1, got {count!r}")
    labels = torch.as_tensor(list(fit.get("fit_labels", range(10))), dtype=torch.long)
    labels = labels.repeat((count + len(labels) - 1) // len(labels))[:count]
    backbone = _backbone(pipe)
    cfg = backbone.config
    x = torch.randn((count, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                    generator=torch.Generator().manual_seed(int(fit.get("fit_seed", 0))))
    x = x.to(next(backbone.parameters()).device)
    den = guided_denoise(backbone, labels.to(x.device), _null_label(pipe), float(guidance))
    base = DEISScheduler.from_config(dict(pipe.scheduler.config))
    grid = _fine_grid(base.schedule, float(base.schedule.t_max), 64, False)
    ref = fine_trajectory(den, base.schedule, base.config.prediction_type, x, np.asarray(grid), 4)[2]
    best: tuple[float, dict] = (float("inf"), {})
    for method, order, grid_name, power in DEIS_FIT_CANDIDATES:
        opts = {"deis_method": method, "deis_order": order, "time_grid": grid_name, "time_grid_power": power}
        sched = DEISScheduler.from_config(dict(pipe.scheduler.config), **opts)
        err = float((run_sampler(den, sched, x, steps).double() - ref).pow(2).mean())
        if err < best[0]:
            best = (err, opts)
    return best[1]


def use_sampler(pipe: Any, name: str, **options: Any) -> Any:
    """Replace ``pipe.scheduler`` with sampler ``name``, built ``from_config`` of the current scheduler.

    Names: dmq's ``"deis"`` and ``"dc-solver"``, and diffusers' own ``"dpm++"`` (DPMSolverMultistepScheduler,
    ``dpmsolver++``), ``"unipc"``, ``"ddim"`` and ``"euler"`` (FlowMatchEulerDiscreteScheduler for flow models).
    The pipeline's noise schedule (betas or flow shift, ``num_train_timesteps``) and prediction type carry over;
    ``options`` set the sampler's own arguments (DEIS: ``deis_method="tab"``, ``deis_order=3``, ``time_grid="time"``;
    DC-Solver: ``ratios=[...]``, ``cpr=`` coefficients or the path of a ``scripts/search_dc.py`` JSON file together
    with ``guidance_scale=`` (the pipeline's CFG scale), ``solver_order=2``, ...; diffusers: their constructor
    arguments). Unknown names or options raise ``ValueError`` listing the valid ones; the pipeline is left
    unchanged then. Returns the pipeline. DEIS and DC-Solver serve EDM's continuous timesteps in VP form (Stable Video
    Diffusion's Euler) and refuse (``ValueError``) EDM's ``sigma_data``-preconditioned schedulers (:func:`edm_reason`).

    ``use_sampler(pipe, "deis", fit=True)`` picks the DEIS variant and grid (:data:`DEIS_FIT_CANDIDATES`) with the
    lowest final-sample error against a fine reference on a few latents of the pipeline's own class-conditional
    backbone (options ``fit_steps=10``, ``fit_guidance_scale=1.0``, ``fit_labels=range(10)``, ``fit_latents=8``,
    ``fit_seed=0``); about 10 x ``fit_steps`` + 256 guided model evaluations.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a sampler name (str), got {type(name).__name__}; available: {sampler_names()}")
    if not hasattr(getattr(pipe, "scheduler", None), "config"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    key = name.lower()
    fit = options.pop("fit", False)
    fit_opts = {k: options.pop(k) for k in FIT_OPTIONS if k in options}
    if not isinstance(fit, bool):
        raise TypeError(f"fit must be True or False, got {fit!r}")
    if (fit or fit_opts) and key != "deis":
        raise ValueError(f"fit=True (and {list(FIT_OPTIONS)}) apply to 'deis' only, got sampler {name!r}; "
                         "for DC-Solver use pipelines.fit_sampler")
    if fit_opts and not fit:
        raise ValueError(f"{sorted(fit_opts)} need fit=True")
    reason = edm_reason(pipe.scheduler.config) if key in SAMPLERS else None
    if reason is not None:
        raise ValueError(f"sampler {name!r} cannot serve {type(pipe).__name__}: {reason}; keep its own scheduler")
    if fit:
        clash = sorted({"deis_method", "deis_order", "time_grid", "time_grid_power"} & set(options))
        if clash:
            raise ValueError(f"fit=True chooses {clash} itself; pass them without fit, or drop them")
        options.update(_fit_deis(pipe, fit_opts))
    if key in PLANNED:
        raise ValueError(f"sampler {name!r} is not available yet; available: {sampler_names()}")
    if key in PASS_THROUGH:
        return _pass_through(pipe, key, options)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {sampler_names()}")
    cls = SAMPLERS[key]
    options = {ALIASES.get(k, k): v for k, v in options.items()}
    if key == "dc-solver":
        options = _dc_inputs(options)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; valid options: {sorted(allowed)}")
    config = dict(pipe.scheduler.config)
    # the source's prediction type must survive even where the sampler's own default differs
    scheduler = cls.from_config(config, **options)
    if "prediction_type" not in options and "prediction_type" in config:
        if scheduler.config.prediction_type != config["prediction_type"]:
            raise ValueError(f"{name!r} cannot keep prediction_type={config['prediction_type']!r}")
    pipe.scheduler = scheduler
    return pipe
