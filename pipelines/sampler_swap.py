"""``use_sampler``: swap a pipeline's scheduler for one of dmq's samplers, keeping its noise schedule."""

from __future__ import annotations

import inspect
from typing import Any

from samplers import DCSolverScheduler, DEISScheduler

SAMPLERS: dict[str, type] = {"deis": DEISScheduler, "dc-solver": DCSolverScheduler}
PLANNED: tuple[str, ...] = ()  # names reserved for samplers that are not available yet
ALIASES = {"ratios": "dc_ratios"}  # use_sampler(pipe, "dc-solver", ratios=[...])


def use_sampler(pipe: Any, name: str, **options: Any) -> Any:
    """Replace ``pipe.scheduler`` with dmq's sampler ``name``, built ``from_config`` of the current scheduler.

    The pipeline's noise schedule (betas or flow shift, ``num_train_timesteps``) and prediction type carry over;
    ``options`` set the sampler's own arguments (DEIS: ``deis_method="tab"``, ``deis_order=3``, ``time_grid="time"``;
    DC-Solver: ``ratios=[...]`` (or ``dc_ratios``), ``cpr=...``, ``solver_order=2``, ...).
    Unknown names or options raise ``ValueError`` listing the valid ones; the pipeline is left unchanged then.
    Returns the pipeline.
    """
    key = name.lower()
    if key in PLANNED:
        raise ValueError(f"sampler {name!r} is not available yet; available: {sorted(SAMPLERS)}")
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
    cls = SAMPLERS[key]
    options = {ALIASES.get(k, k): v for k, v in options.items()}
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
