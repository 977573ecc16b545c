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


def use_sampler(pipe: Any, name: str, **options: Any) -> Any:
    """Replace ``pipe.scheduler`` with sampler ``name``, built ``from_config`` of the current scheduler.

    Names: dmq's ``"deis"`` and ``"dc-solver"``, and diffusers' own ``"dpm++"`` (DPMSolverMultistepScheduler,
    ``dpmsolver++``), ``"unipc"``, ``"ddim"`` and ``"euler"`` (FlowMatchEulerDiscreteScheduler for flow models).
    The pipeline's noise schedule (betas or flow shift, ``num_train_timesteps``) and prediction type carry over;
    ``options`` set the sampler's own arguments (DEIS: ``deis_method="tab"``, ``deis_order=3``, ``time_grid="time"``;
    DC-Solver: ``ratios=[...]``, ``cpr=`` coefficients or the path of a ``scripts/search_dc.py`` JSON file together
    with ``guidance_scale=`` (the pipeline's CFG scale), ``solver_order=2``, ...; diffusers: their constructor
    arguments). Unknown names or options raise ``ValueError`` listing the valid ones; the pipeline is left
    unchanged then. Returns the pipeline.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a sampler name (one of {sampler_names()}), got {type(name).__name__}")
    if not hasattr(getattr(pipe, "scheduler", None), "config"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    key = name.lower()
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
