"""Searched sampling schedules: the NFE-step timesteps that minimise the final-sample error against a fine reference.

Two stages, chosen by measurement (docs/samplers.md, ``scripts/bench_samplers.py``):

1. **Dynamic programming over a fine grid** (GITS: Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
   Sampling", ICML 2024, Sec. 4). A fine teacher solve records the state and the model output at ``M`` points
   uniform in ``log ρ``. The cost of jumping from point ``i`` to point ``j`` is the error of one DDIM step from the
   teacher state at ``i`` (model output known, so the ``M²/2`` costs need no further model evaluations) against the
   teacher state at ``j``. The cheapest ``N``-jump path is found exactly in ``O(N M²)``.
2. **Refinement of the actual solver** (the objective of LD3: Tong et al., "Learning to Discretize Denoising
   Diffusion ODEs", ICLR 2025, Eq. 6: the final-sample distance of the real multistep solver). LD3 follows the
   gradient through the solver; our plans are float64 NumPy, so a derivative-free pattern search in ``log ρ`` moves
   one node at a time while the final-sample error on the search latents falls.

Robustness: part of the latents is held out. A schedule that is worse on them than the scheduler's own default grid
is rejected, the default is kept, and the reason is logged (the DC ratio search does the same).

The objective pools the per-latent mean squared errors ``e_b``: ``"mse"`` is their mean (the final-sample MSE),
``"geomean"`` their geometric mean ``exp(mean log e_b)`` and ``"median"`` their median. Few-step errors are
heavy-tailed (a latent near a mode boundary lands in the other mode), and one such latent sets the mean; the
geometric mean and the median weigh every latent's relative improvement alike. The held-out check uses the same
objective.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedules import NoiseSchedule, VPSchedule

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "ScheduleSearchResult",
    "fine_trajectory",
    "noise_schedule_of",
    "pooled_error",
    "run_sampler",
    "search_schedule",
    "searched_timesteps_kwargs",
    "held_out_rows",
    "held_out_verdict",
]

logger = logging.getLogger(__name__)
METHODS = ("dp", "dp+refine", "refine")
# how the per-latent mean squared errors of the final samples are pooled into one number (module docstring)
OBJECTIVES = ("mse", "geomean", "median")
# solver options a joint search may change (they only change the update plan, never the schedule or the state)
VARIANT_KEYS = {
    "DEISScheduler": ("deis_method", "deis_order", "deis_lower_order"),
    "DCSolverScheduler": ("solver_order", "solver_type", "corrector", "lower_order_final", "disable_corrector"),
}
# ``variants="auto"``: alternatives worth trying at few steps, besides the scheduler as given. DEIS' default caps the
# polynomial degree below 8 steps (degree 1 at NFE 5); UniPC's B(h) = h and order 3 are the UniPC paper's other
# variants. Measured on the DiT at NFE 5 and trimmed (docs/samplers.md): DEIS degree 1 without the cap is the default
# there, and iPNDM and UniPC-3 with B(h) = h never won.
AUTO_VARIANTS = {
    "DEISScheduler": ({"deis_order": 2, "deis_lower_order": False}, {"deis_order": 3, "deis_lower_order": False}),
    "DCSolverScheduler": ({"solver_type": "bh1"}, {"solver_order": 3}),
}
Denoise = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class ScheduleSearchResult:
    """What :func:`search_schedule` found. Errors are the per-latent mean squared final-sample errors against the
    reference, pooled by ``objective`` (``"mse"``: their mean)."""

    timesteps: list[float]
    accepted: bool
    reason: str
    search_error: float
    default_search_error: float
    held_out_error: float | None = None
    default_held_out_error: float | None = None
    default_timesteps: list[float] = field(default_factory=list)
    model_evaluations: int = 0
    config: dict = field(default_factory=dict)
    variant_errors: list[tuple[dict, float]] = field(default_factory=list)
    objective: str = "mse"


# ---------------------------------------------------------------------------------------------------------------------
# adapters: our schedulers and diffusers' ones


def _is_ours(scheduler: Any) -> bool:
    return hasattr(scheduler, "set_searched_timesteps") and hasattr(scheduler, "schedule")


def noise_schedule_of(scheduler: Any) -> NoiseSchedule:
    """The continuous noise schedule of ``scheduler`` (ours: its own; diffusers VP: from ``alphas_cumprod``).

    Raises for schedulers that cannot take a custom schedule (no ``timesteps=`` in ``set_timesteps``)."""
    if _is_ours(scheduler):
        return scheduler.schedule
    cfg = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch") or cfg.get("use_flow_sigmas"):
        raise ValueError(
            f"search_schedule supports diffusers' VP schedulers (timesteps=); for the flow scheduler "
            f"{type(scheduler).__name__} use samplers.DEISScheduler or DCSolverScheduler (from_config)"
        )
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise TypeError(f"{type(scheduler).__name__}.set_timesteps takes no `timesteps=`, so it cannot run a searched "
                        "schedule; use samplers.DEISScheduler or DCSolverScheduler (DCSolverScheduler without ratios "
                        "is UniPC) built with from_config")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: not a VP scheduler")
    return VPSchedule(ac.double().cpu().numpy())


def _prediction_type(scheduler: Any) -> str:
    return str(scheduler.config.get("prediction_type", "epsilon"))


def _convert(pred: str, out: torch.Tensor, x: torch.Tensor, a: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε, x̂0)`` from a raw model output (see ``DEISScheduler.convert_output``; no thresholding here)."""
    if pred == "epsilon":
        return out, (x - s * out) / a
    if pred == "sample":
        return (x - a * out) / s, out
    if pred == "v_prediction":
        return s * x + a * out, a * x - s * out
    if pred == "flow_prediction":
        return x + a * out, x - s * out
    raise ValueError(f"unsupported prediction_type {pred!r}")


def _set(scheduler: Any, n: int | None, timesteps: Sequence[float] | None, device: Any) -> None:
    if timesteps is None:
        scheduler.set_timesteps(n, device=device)
    elif _is_ours(scheduler):
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        scheduler.set_timesteps(timesteps=[int(round(t)) for t in timesteps], device=device)


def _default_timesteps(scheduler: Any, n: int) -> list[float]:
    """The scheduler's own grid for ``n`` steps (a searched schedule in our config is ignored)."""
    saved = scheduler.config.get("searched_timesteps")
    if saved is not None and _is_ours(scheduler):
        scheduler.register_to_config(searched_timesteps=None)
    try:
        scheduler.set_timesteps(n)
        order = int(getattr(scheduler, "order", 1) or 1)
        ts = [float(t) for t in scheduler.timesteps.double().cpu()]
        return ts[::order] if order > 1 else _dedupe(ts)
    finally:
        if saved is not None and _is_ours(scheduler):
            scheduler.register_to_config(searched_timesteps=saved)


def _dedupe(ts: list[float]) -> list[float]:
    out: list[float] = []
    for t in ts:
        if not out or t != out[-1]:
            out.append(t)
    return out


@torch.no_grad()
def run_sampler(
    denoise: Denoise, scheduler: Any, latents: torch.Tensor, num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
) -> torch.Tensor:
    """The final sample of ``scheduler`` from ``latents`` (the usual diffusers loop: ``init_noise_sigma``,
    ``scale_model_input``, ``step``) on its default grid or on ``timesteps``."""
    _set(scheduler, num_inference_steps, timesteps, latents.device)
    x = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))
    for t in scheduler.timesteps:
        out = denoise(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


def searched_timesteps_kwargs(scheduler: Any, num_inference_steps: int) -> dict:
    """``{"timesteps": [...]}`` to pass to a pipeline call (or ``set_timesteps``) when ``scheduler``'s config holds a
    searched schedule of ``num_inference_steps`` steps, else ``{}``. Our schedulers apply it on their own."""
    ts = scheduler.config.get("searched_timesteps")
    if ts is None or len(ts) != num_inference_steps:
        return {}
    return {"timesteps": [float(t) for t in ts] if _is_ours(scheduler) else [int(round(t)) for t in ts]}


def held_out_rows(batch: int, held_out: float | int | None) -> int:
    """How many of ``batch`` latents (the last rows) are held out: a fraction in (0, 1) or a count; ``None``: 0.

    The denoiser is called on the whole batch (it may carry per-row labels or prompts); only the errors are split.
    """
    if held_out is None:
        return 0
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise TypeError(f"held_out must be None, a fraction in (0, 1) or a row count, got {held_out!r}")
    k = int(held_out) if isinstance(held_out, int) else int(round(batch * held_out))
    if (isinstance(held_out, float) and not 0 < held_out < 1) or not 1 <= k < batch:
        raise ValueError(f"held_out={held_out!r} of {batch} latents must leave at least one search and one held-out "
                         "row (a fraction in (0, 1) or a count in [1, batch - 1])")
    return k


def held_out_verdict(what: str, baseline: str, err: float, base_err: float, k: int,
                     held: Callable[[], tuple[float, float]]) -> tuple[str, float | None, float | None]:
    """The acceptance rule of the searches and fits: ``what`` must beat ``baseline`` on the search latents
    (``err < base_err``), then on the ``k`` held-out ones (``held()``: both errors there, computed only then).

    Returns ``(reason, held-out error, baseline's held-out error)``; an empty reason accepts."""
    if err >= base_err:
        return f"{what} is no better than {baseline} on the search latents ({err:.3e} >= {base_err:.3e})", None, None
    if not k:
        return "", None, None
    h, hb = held()
    if h >= hb:
        return (f"{what} is worse than {baseline} on {k} held-out latents ({h:.3e} >= {hb:.3e}): overfitted the "
                "search latents", h, hb)
    return "", h, hb


# ---------------------------------------------------------------------------------------------------------------------
# the fine teacher


def _fine_grid(sch: NoiseSchedule, t0: float, points: int, integer: bool) -> np.ndarray:
    """``t0`` then ``points`` timesteps uniform in ``log ρ`` from just below ``t0`` down to ``t_min``."""
    top = float(sch.rho(t0))
    if not math.isfinite(top):  # flow σ = 1: the log grid starts one train step below
        top = float(sch.rho(t0 - 1.0))
    lo = float(sch.rho(sch.t_min))
    logs = np.linspace(math.log(top), math.log(lo), points + 1)[1:]
    ts = np.concatenate([[t0], sch.t_of_rho(np.exp(logs))])
    if integer:
        ts = np.unique(np.round(ts))[::-1]
    ts = ts[np.concatenate([[True], np.diff(ts) < 0])]
    return ts.astype(np.float32).astype(np.float64)


@torch.no_grad()
def fine_trajectory(
    denoise: Denoise, sch: NoiseSchedule, prediction_type: str, latents: torch.Tensor, grid: np.ndarray,
    substeps: int = 4, progress: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """A fine DDIM solve (``substeps`` per grid interval, uniform in ``log ρ``) through ``grid`` down to ``σ = 0``.

    Returns the states at the grid points, the model outputs there and the final sample (float64)."""
    x = latents.to(torch.float64)
    states, outputs = [], []
    targets = list(grid[1:]) + [None]
    bar = tqdm(total=len(grid), desc="fine reference", disable=not progress)
    for t, t_next in zip(grid, targets):
        states.append(x.clone())
        r0 = float(sch.rho(t))
        r1 = float(sch.rho(sch.t_min)) if t_next is None else float(sch.rho(t_next))
        lo0 = math.log(r0) if math.isfinite(r0) else math.log(float(sch.rho(t - 1.0)))
        # from σ = 1 (flow) the first sub-step lands on the log grid; the last interval ends with a step to σ = 0
        rhos = [math.exp(lo0 + (math.log(r1) - lo0) * k / substeps) for k in range(1, substeps + 1)]
        if t_next is None:
            rhos = [r for r in rhos if r < r0] + [0.0]
        rho, tt = r0, float(t)
        for i, r in enumerate(rhos):
            out = denoise(x.to(latents.dtype), torch.tensor(tt, dtype=torch.float64)).to(torch.float64)
            if i == 0:
                outputs.append(out)
            a, s = (float(v) for v in sch.alpha_sigma(rho))
            eps, x0 = _convert(prediction_type, out, x, a, s)
            a2, s2 = (float(v) for v in sch.alpha_sigma(r))
            x = a2 * x0 + s2 * eps
            rho, tt = r, float(sch.t_of_rho(r))
        bar.update(1)
    bar.close()
    return states, outputs, x


def _dp_path(cost: np.ndarray, steps: int) -> list[int]:
    """Cheapest path ``0 → F`` (``F`` = last index) with exactly ``steps`` jumps forward (GITS, Alg. 1)."""
    m = cost.shape[0]
    best = np.full((steps + 1, m), np.inf)
    back = np.zeros((steps + 1, m), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + cost  # [i, j]: reach i in k-1 jumps, then jump i → j
        back[k] = np.argmin(total, axis=0)
        best[k] = total[back[k], np.arange(m)]
    path = [m - 1]
    for k in range(steps, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]


# ---------------------------------------------------------------------------------------------------------------------


def pooled_error(a: torch.Tensor, b: torch.Tensor, objective: str = "mse") -> float:
    """The per-latent mean squared errors of ``a`` against ``b`` (rows = latents) pooled by ``objective``
    (:data:`OBJECTIVES`): their mean, geometric mean or median. A non-finite error counts as ``inf``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    per = (a.to(torch.float64) - b.to(torch.float64)).pow(2).reshape(a.shape[0], -1).mean(1)
    per = torch.where(torch.isfinite(per), per, torch.full_like(per, math.inf))
    if objective == "mse":
        v = per.mean()
    elif objective == "median":  # the mean of the two middle values for an even count (torch.median takes the lower)
        v = per.sort().values[(per.numel() - 1) // 2:per.numel() // 2 + 1].mean()
    else:  # exact zeros (a latent the solver reproduces exactly) would send log to -inf
        v = per.clamp_min(torch.finfo(torch.float64).tiny).log().mean().exp()
    return float(v)


def _variant(scheduler: Any, overrides: dict) -> Any:
    """A copy of ``scheduler`` (one of ours) with solver ``overrides`` (:data:`VARIANT_KEYS`); ``{}``: itself."""
    if not overrides:
        return scheduler
    name = type(scheduler).__name__
    allowed = VARIANT_KEYS.get(name)
    if allowed is None or not _is_ours(scheduler):
        raise ValueError(f"variants apply to {sorted(VARIANT_KEYS)}, got a {name}")
    bad = sorted(set(overrides) - set(allowed))
    if bad or overrides.get("deis_method") == "rhork":
        raise ValueError(f"variants of {name} may set {list(allowed)} (deis_method not 'rhork': its stages change "
                         f"the number of model evaluations), got {overrides!r}")
    return type(scheduler).from_config(scheduler.config, **{"searched_timesteps": None, **overrides})


def search_schedule(
    denoise: Denoise,
    scheduler: Any,
    latents: torch.Tensor,
    num_inference_steps: int,
    *,
    reference: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference_denoise: Denoise | None = None,
    held_out: float | int | None = 0.5,
    method: str = "dp+refine",
    objective: str = "mse",
    variants: Sequence[dict] | str | None = None,
    grid_points: int = 64,
    substeps: int = 4,
    refine_rounds: int = 4,
    store: bool = True,
    progress: bool = True,
) -> ScheduleSearchResult:
    """Search the ``num_inference_steps``-step schedule of ``scheduler`` for ``denoise`` (module docstring).

    Args:
        denoise: ``denoise(x, t)``: the raw model output at model input ``x`` and timestep ``t`` (guidance applied).
        scheduler: a :class:`~samplers.DEISScheduler` / :class:`~samplers.DCSolverScheduler`, or a diffusers VP
            scheduler whose ``set_timesteps`` accepts ``timesteps=`` (DPM-Solver++, UniPC, DEIS, Euler, ...).
        latents: ``x_T`` at the scheduler's first default timestep, ``(B, ...)``.
        num_inference_steps: steps of the schedule (model evaluations for multistep solvers).
        reference: the final samples the schedule should reach from ``latents`` (all rows, held-out ones
            included), or a callable ``latents -> final samples`` (an exact ODE solution). Default: the fine DDIM
            teacher below (``samplers``' own fine reference).
        reference_denoise: the model of the teacher trajectory and reference, when it differs from ``denoise``
            (quantization-aware search: ``denoise`` quantized, ``reference_denoise`` full precision).
        held_out: the last rows of ``latents`` kept out of the search (a fraction, or a count). A schedule that is
            worse on them than the default grid is rejected. ``None``: no check.
        method: ``"dp"`` (GITS), ``"dp+refine"`` (the pattern search on the real solver, started from the better
            of the DP schedule and the default grid) or ``"refine"`` (pattern search from the default grid).
        objective: how the per-latent errors are pooled, for the search and the held-out check alike:
            ``"mse"`` (mean), ``"geomean"`` or ``"median"`` (robust to a few latents that change mode; module
            docstring). The result's errors are in these units.
        variants: solver options searched jointly with the schedule (our schedulers only), e.g.
            ``[{"deis_order": 2, "deis_lower_order": False}]``: the scheduler as given and each variant are refined
            on the shared teacher and DP result; the lowest search error wins and is written into the config with
            the schedule
            (keys: :data:`VARIANT_KEYS`); ``"auto"``: :data:`AUTO_VARIANTS` (none for diffusers' schedulers).
            The checks compare the winner with the scheduler *as given* on its
            default grid.
        grid_points, substeps: the fine grid (points uniform in ``log ρ``) and DDIM sub-steps per interval of the
            teacher (``grid_points * substeps`` model evaluations per latent).
        refine_rounds: sweeps of the pattern search over the nodes.
        store: write the accepted schedule into ``scheduler``'s config (``searched_timesteps``; saved by
            ``save_pretrained``). Our schedulers then use it for ``set_timesteps(num_inference_steps)``; for a
            diffusers scheduler pass :func:`searched_timesteps_kwargs` to the pipeline.
        progress: show tqdm bars.

    Returns a :class:`ScheduleSearchResult` (``config``: the winning variant's options, ``{}`` for the scheduler as
    given; ``variant_errors``: each variant's search error).
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int >= 2, got {num_inference_steps!r}")
    if num_inference_steps < 2:
        raise ValueError(f"num_inference_steps must be >= 2 (one step has nothing to search), "
                         f"got {num_inference_steps}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, v, lo in (("grid_points", grid_points, 2), ("substeps", substeps, 1),
                        ("refine_rounds", refine_rounds, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(latents, torch.Tensor) or latents.ndim < 1:
        raise TypeError(f"latents must be a tensor (B, ...), got {type(latents).__name__}")
    if reference is not None and not (callable(reference) or isinstance(reference, torch.Tensor)):
        raise TypeError(f"reference must be None, a tensor or a callable, got {type(reference).__name__}")
    if isinstance(reference, torch.Tensor) and reference.shape != latents.shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)} but latents {tuple(latents.shape)}")
    if variants == "auto":
        variants = AUTO_VARIANTS.get(type(scheduler).__name__, ()) if _is_ours(scheduler) else ()
    if variants is not None and (isinstance(variants, (str, dict)) or not all(isinstance(v, dict) for v in variants)
                                 or len(variants) == 0):
        raise TypeError(f"variants must be None, 'auto' or a non-empty list of dicts of solver options, "
                        f"got {variants!r}")
    # the scheduler as given is always a candidate (index 0), and the baseline of the acceptance checks
    solver = scheduler  # the solver the schedule is searched for: without a fitted table (fitted to other nodes)
    if _is_ours(scheduler) and scheduler.config.get("fitted_coefficients") is not None:
        solver = type(scheduler).from_config(scheduler.config, fitted_coefficients=None, fitted_timesteps=None)
    trials = [({}, solver)] + [(dict(v), _variant(solver, dict(v))) for v in variants or () if v]
    n = int(num_inference_steps)
    sch = noise_schedule_of(scheduler)
    pred = _prediction_type(scheduler)
    teacher = reference_denoise or denoise
    order = int(getattr(scheduler, "order", 1) or 1)
    evals = 0

    k = held_out_rows(latents.shape[0], held_out)
    rows = latents.shape[0] - k  # search rows first, held-out rows last
    default = _default_timesteps(scheduler, n)
    integer = not _is_ours(scheduler)
    grid = _fine_grid(sch, default[0], grid_points, integer)
    states, outputs, final = fine_trajectory(teacher, sch, pred, latents, grid, substeps, progress)
    evals += len(grid) * substeps
    ref = final if reference is None else (reference(latents) if callable(reference) else reference)
    ref = ref.to(torch.float64)
    if reference_denoise is not None:  # the searched model's outputs at the teacher's states
        with torch.no_grad():
            outputs = [denoise(x.to(latents.dtype), torch.tensor(float(t), dtype=torch.float64)).to(torch.float64)
                       for x, t in zip(states, grid)]
        evals += len(grid)
    finals: dict[tuple, torch.Tensor] = {}

    def sample(v: int, ts: Sequence[float]) -> torch.Tensor:
        nonlocal evals
        key = (v, *(float(t) for t in ts))
        if key not in finals:
            evals += n * order
            finals[key] = run_sampler(denoise, trials[v][1], latents, timesteps=ts).to(torch.float64)
        return finals[key]

    def pooled(x: torch.Tensor, part: slice) -> float:
        return pooled_error(x[part], ref[part], objective)

    search, check = slice(None, rows), slice(rows, None)
    dp = None if method == "refine" else _dp_schedule(
        sch, pred, grid, [x[search] for x in states], [o[search] for o in outputs], ref[search], n, objective)
    found = []  # (search error, variant index, timesteps)
    for v in range(len(trials)):
        def loss(ts: Sequence[float], v: int = v) -> float:
            return pooled(sample(v, ts), search)

        default_err_v = loss(default)
        ts, err = (list(default), default_err_v) if dp is None else (list(dp), loss(dp))
        if method == "dp+refine" and default_err_v < err:  # refine from the better start (DEIS' grid is often good)
            ts, err = list(default), default_err_v
        if method != "dp" and refine_rounds > 0:
            ts, err = _refine(loss, sch, ts, err, refine_rounds, integer, progress)
        found.append((err, v, [float(np.float32(t)) for t in ts]))  # what the scheduler feeds the model
    err, v, ts = min(found, key=lambda f: f[0])
    default_err = pooled(sample(0, default), search)
    result = ScheduleSearchResult(ts, True, "", err, default_err, default_timesteps=default, config=trials[v][0],
                                  variant_errors=[(trials[f[1]][0], f[0]) for f in found], objective=objective)
    result.reason, result.held_out_error, result.default_held_out_error = held_out_verdict(
        "searched schedule", "the default", err, default_err, k,
        lambda: (pooled(sample(v, ts), check), pooled(sample(0, default), check)))
    result.accepted = not result.reason
    result.model_evaluations = evals * latents.shape[0]
    if not result.accepted:
        logger.warning("search_schedule: keeping the default grid: %s", result.reason)
    elif store:
        if result.config:
            scheduler.register_to_config(**result.config)
        _store(scheduler, result.timesteps)
    return result


def _store(scheduler: Any, timesteps: list[float]) -> None:
    if _is_ours(scheduler):  # a fitted table belongs to the old schedule and solver
        scheduler.register_to_config(fitted_coefficients=None, fitted_timesteps=None)
        scheduler.set_searched_timesteps(timesteps)
    else:  # survives save_pretrained/from_pretrained as a config entry diffusers keeps but does not use
        scheduler.register_to_config(searched_timesteps=[int(round(t)) for t in timesteps])


def _dp_schedule(sch: NoiseSchedule, pred: str, grid: np.ndarray, states: list[torch.Tensor],
                 outputs: list[torch.Tensor], final: torch.Tensor, n: int, objective: str = "mse") -> list[float]:
    """GITS: cost[i, j] = error (pooled by ``objective``) of one DDIM step from teacher state i to point j against
    the teacher there."""
    m = len(grid)
    targets = states + [final]
    cost = np.full((m + 1, m + 1), np.inf)
    for i in range(m):
        a, s = (float(v) for v in sch.alpha_sigma(sch.rho(grid[i])))
        eps, x0 = _convert(pred, outputs[i], states[i], a, s)
        for j in range(i + 1, m + 1):
            rho_j = 0.0 if j == m else float(sch.rho(grid[j]))
            a2, s2 = (float(v) for v in sch.alpha_sigma(rho_j))
            cost[i, j] = pooled_error(a2 * x0 + s2 * eps, targets[j], objective)
    path = _dp_path(cost, n)
    return [float(grid[i]) for i in path[:-1]]


def _refine(objective: Callable[[Sequence[float]], float], sch: NoiseSchedule, ts: list[float], err: float,
            rounds: int, integer: bool, progress: bool) -> tuple[list[float], float]:
    """Pattern search in ``log ρ``: move one interior node at a time by ±δ (δ halves each round) within its
    neighbours, keep a move when the final-sample error falls."""
    logr = [math.log(float(sch.rho(t))) if math.isfinite(float(sch.rho(t))) else math.inf for t in ts]
    lo_bound = math.log(float(sch.rho(sch.t_min)))
    delta = 0.25 * (logr[1] - logr[-1]) / max(len(ts) - 1, 1) if len(ts) > 2 else 0.25
    bar = tqdm(total=rounds * (len(ts) - 1), desc="schedule refine", disable=not progress)
    for _ in range(rounds):
        for k in range(1, len(ts)):
            for sign in (1.0, -1.0):
                cand = logr[k] + sign * delta
                upper = logr[k - 1] if math.isfinite(logr[k - 1]) else math.log(float(sch.rho(sch.t_max - 1.0)))
                lower = logr[k + 1] if k + 1 < len(ts) else lo_bound
                if not lower < cand < upper:
                    continue
                t_new = float(sch.t_of_rho(math.exp(cand)))
                if integer:
                    t_new = float(round(t_new))
                trial = ts[:k] + [t_new] + ts[k + 1:]
                # the schedulers hold timesteps in float32: nodes a float64 step apart can meet there
                if t_new in ts or np.any(np.diff(np.asarray(trial, dtype=np.float32)) >= 0):
                    continue
                e = objective(trial)
                if e < err:
                    ts, err, logr[k] = trial, e, cand
                    break
            bar.update(1)
        delta /= 2
    bar.close()
    return ts, err
