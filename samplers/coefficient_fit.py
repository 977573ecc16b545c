"""Solver coefficients fitted to a model: each step's linear combination solved by least squares against a teacher.

Learned solver coefficients are what the strongest few-step samplers add to a searched schedule (S4S: Frankel et
al., "S4S: Solving for a Diffusion Model Solver", ICML 2025, learns the coefficients of a multistep solver against
teacher samples; DPM-Solver-v3: Zheng et al., NeurIPS 2023, fits its coefficients to empirical model statistics).
Our form is the table of :mod:`samplers.linear_solver`, Eq. (1): ``x_{i+1} = a_i x_i + sum_k b_{i,k} x̂0_k``.

The fit is sequential and exact per step. Start from the scheduler's own rows (its schedule, solver, ratios), run the
model at the current points of the search latents, and solve step ``i``'s ``i + 2`` numbers by least squares so that
``x_{i+1}`` meets the teacher state at ``t_{i+1}`` (the last step: the teacher's final sample); then step on with
the fitted row, so that every later step is fitted on the states the fitted solver really reaches. The cost is one
sampling run (``N`` evaluations per latent) beyond the teacher. The default teacher is one fine DDIM solve shared
by every schedule (:class:`samplers.fine_teacher.FineTeacher`): a schedule with new nodes costs one evaluation a
node. ``ridge`` pulls each row towards the solver's own (Tikhonov, scaled by the Gram diagonal). Part of the
latents is held out: a table that is worse there than the solver it started from is rejected, as
:func:`samplers.search_schedule` does.

The nodes that suit a fitted table are not those that suit its solver (a grid the solver uses badly can be the
fitted table's best), so ``grids`` fits the table on other schedules too and keeps the one with the lowest error
on the search latents that also passes the held-out check.

``node_rounds`` then moves the nodes of the best of those schedules, with a fit at every trial: the pattern search in
``log ρ`` of :func:`samplers.search_schedule`, on the fitted table's final error instead of the solver's (a joint
search of schedule and coefficients, in the spirit of S4S-Alt, which alternates between the two). On the Gaussian
mixtures at NFE 5 it lowered the held-out error as well as the search error (docs/samplers.md).

The sequential fit makes every intermediate state meet the teacher's, which the final sample does not need.
``refine_iters`` then refines the chosen table as a whole: all rows at once minimise the final-sample error of the
search latents (S4S, Sec. 3: the solver's coefficients against the teacher's final samples), by L-BFGS (or Adam, for
a quantized backbone) through the model. It is kept only if it beats the sequential fit on the held-out latents too:
on the Gaussian mixtures it lowered the search error and sent more boundary latents into the wrong component; on the
bundled U-Net at NFE 5 it lowered the error on fresh latents (docs/samplers.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .dc import _check_differentiable
from .fine_teacher import FineTeacher
from .linear_solver import solver_coefficients, table_update
from .schedule_search import (
    Denoise,
    _is_ours,
    _refine,
    held_out_rows,
    held_out_verdict,
    noise_schedule_of,
    pooled_error,
    run_sampler,
)

__all__ = ["AUTO_GRIDS", "CoefficientFitResult", "fit_coefficients"]

logger = logging.getLogger(__name__)


# ``grids="auto"``: schedules tried besides the scheduler's own. A fitted solver wants other nodes than its own
# solver does: on the bundled DiT at NFE 10, UniPC fitted on t = 999 (1 - i/N)^2 reached 0.0147 RMSE, on its
# searched schedule 0.0193 (docs/samplers.md).
AUTO_GRIDS = ({"time_grid": "time", "time_grid_power": 1.0}, {"time_grid": "time", "time_grid_power": 1.5},
              {"time_grid": "time", "time_grid_power": 2.0}, {"time_grid": "time", "time_grid_power": 2.5},
              {"time_grid": "time", "time_grid_power": 3.0}, {"time_grid": "log_rho"})

REFINE_OPTIMIZERS = ("lbfgs", "adam")
# Adam's step for the refinement: a table's rows nearly cancel one another, so a step of 3e-3 per coefficient sent
# the W4A8 DiT's NFE-10 table from 0.044 to 0.18 RMSE, where 1e-4 lowered it (docs/samplers.md).
ADAM_LR = 1e-4


@dataclass
class CoefficientFitResult:
    """What :func:`fit_coefficients` found. Errors are final-sample MSEs against the teacher's final samples;
    ``base_*`` are the scheduler's own solver on its own schedule, the baseline of the checks. ``grid_errors``:
    each schedule and its best table's search error; ``candidates``: every table tried (timesteps, its
    ``solver_rows``, search error); ``solver_rows``: the first steps of the chosen table left on the solver's rows;
    ``nodes_refined_from``: the schedule the node search (``node_rounds``) started from. ``refined``: the table is
    the sequential fit refined as a whole (``refine_iters``); ``unrefined_*``: the sequential fit's errors;
    ``refine_reason``: why a refinement was not kept (empty when it was, or none ran)."""

    coefficients: list[list[float]]
    base_coefficients: list[list[float]]
    timesteps: list[float]
    accepted: bool
    reason: str
    search_error: float
    base_search_error: float
    held_out_error: float | None = None
    base_held_out_error: float | None = None
    model_evaluations: int = 0
    grid_errors: list[tuple[list[float], float]] = field(default_factory=list)
    solver_rows: int = 0
    candidates: list[tuple[list[float], int, float]] = field(default_factory=list)
    nodes_refined_from: list[float] | None = None
    refined: bool = False
    unrefined_search_error: float | None = None
    unrefined_held_out_error: float | None = None
    refine_reason: str = ""


class _Table(NamedTuple):
    """One fitted table: its search error, schedule, rows, final samples, the teacher's final samples, the solver's
    own rows on that schedule, and how many first steps kept them."""

    error: float
    timesteps: list[float]
    table: list[list[float]]
    samples: torch.Tensor
    final: torch.Tensor
    base: list[list[float]]
    solver_rows: int


def _target(reference: Sequence[torch.Tensor] | Callable[[int, float], torch.Tensor], i: int,
            t_next: float) -> torch.Tensor:
    return (reference(i, t_next) if callable(reference) else reference[i]).to(torch.float64)


def _grid(scheduler: Any, n: int, grid: Any) -> list[float]:
    """The ``n`` timesteps of one entry of ``grids``: a list of timesteps, or scheduler options naming a grid."""
    if isinstance(grid, dict):
        probe = type(scheduler).from_config(scheduler.config, **{"searched_timesteps": None, **grid})
        probe.set_timesteps(n)
        return [float(t) for t in probe.timesteps.double()]
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != n:
        raise ValueError(f"each entry of grids must be {n} timesteps or a dict of grid options "
                         f"(time_grid, time_grid_power, ...), got {grid!r}")
    return [float(t) for t in grid]


def _fit_table(denoise: Denoise, solver: Any, latents: torch.Tensor, base: list[list[float]],
               targets: list[torch.Tensor], rows: int, ridge: float, keep: int,
               progress: bool) -> tuple[list[list[float]], torch.Tensor]:
    """The sequential least-squares fit of one schedule (module docstring), the first ``keep`` steps on the solver's
    own rows; returns the table and its samples."""
    ts = solver.timesteps
    x = latents.to(torch.float64) * float(solver.init_noise_sigma)
    x0s: list[torch.Tensor] = []
    table: list[list[float]] = []
    for i in tqdm(range(len(ts)), desc="coefficient fit", disable=not progress):
        out = denoise(solver.scale_model_input(x, ts[i]).to(latents.dtype), ts[i]).to(torch.float64)
        x0s.append(solver.convert_output(out, x, solver._alphas[i], solver._sigmas_f[i])[1])
        if i < keep:
            table.append(list(base[i]))
            x = table_update(base[i], x, x0s)
            continue
        feats = torch.stack([x] + x0s)[:, :rows].reshape(i + 2, -1)
        own = torch.tensor(base[i], dtype=torch.float64)
        resid = targets[i][:rows].reshape(-1) - own @ feats
        gram = feats @ feats.T
        lhs = gram + ridge * torch.diag(torch.diag(gram))
        delta = torch.linalg.lstsq(lhs, (feats @ resid).unsqueeze(1), driver="gelsd").solution.squeeze(1)
        row = [float(v) for v in own + delta]
        if not all(math.isfinite(v) for v in row):  # a degenerate step (all features zero): keep the solver's row
            row = list(base[i])
        table.append(row)
        x = table_update(row, x, x0s)
    return table, x


def _run_table(denoise: Denoise, solver: Any, latents: torch.Tensor, table: Sequence[Sequence[Any]]) -> torch.Tensor:
    """The final samples of Eq. (1) on ``table`` (rows of floats or of 0-d tensors with grad).

    Under grad the model runs twice a step: the value is the no-grad output, the derivative the differentiable
    path's. A quantized backbone takes its straight-through reference path under grad, which computes about 0.2%
    differently from the integer kernels on the W4A8 DiT; the refinement must optimise the model that samples."""
    x = latents.to(torch.float64) * float(solver.init_noise_sigma)
    x0s: list[torch.Tensor] = []
    for i, t in enumerate(solver.timesteps):
        inp = solver.scale_model_input(x, t).to(latents.dtype)
        with torch.no_grad():
            out = denoise(inp.detach(), t).to(torch.float64)
        if torch.is_grad_enabled() and x.requires_grad:
            path = denoise(inp, t).to(torch.float64)
            out = path + (out - path).detach()
        x0s.append(solver.convert_output(out, x, solver._alphas[i], solver._sigmas_f[i])[1])
        # not table_update: it skips zero coefficients, and a zero with grad must still get its derivative
        x = table[i][0] * x + sum(c * d for c, d in zip(table[i][1:], x0s))
    return x


def _refine_table(denoise: Denoise, solver: Any, latents: torch.Tensor, table: list[list[float]],
                  final: torch.Tensor, rows: int, iters: int, optimizer: str = "lbfgs"
                  ) -> tuple[list[list[float]], int]:
    """All rows of ``table`` at once, on the final-sample MSE of the first ``rows`` latents against ``final``; returns
    the table and the number of sampling runs (each with a backward).

    ``"lbfgs"``: L-BFGS with a strong Wolfe line search. ``"adam"``: :data:`ADAM_LR` steps, keeping the iterate with
    the lowest loss. On a quantized backbone the loss is piecewise constant at the scale of one activation step
    and its derivative is the straight-through one, so the line search stalls; first-order steps still descend."""
    start = [torch.tensor(r, dtype=torch.float64) for r in table]
    deltas = [torch.zeros_like(r, requires_grad=True) for r in start]
    runs = [0]
    target = final[:rows].to(torch.float64)

    def loss_and_grad() -> torch.Tensor:
        runs[0] += 1
        with torch.enable_grad():
            loss = (_run_table(denoise, solver, latents, [r + d for r, d in zip(start, deltas)])[:rows]
                    - target).pow(2).mean()
            loss.backward()
        return loss.detach()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(deltas, lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            return loss_and_grad()

        opt.step(closure)
        best = [d.detach().clone() for d in deltas]
    else:
        opt = torch.optim.Adam(deltas, lr=ADAM_LR)
        best, best_loss = [d.detach().clone() for d in deltas], math.inf
        for _ in range(iters):
            opt.zero_grad()
            loss = float(loss_and_grad())
            if loss < best_loss:  # the loss of the current iterate, before its step
                best, best_loss = [d.detach().clone() for d in deltas], loss
            opt.step()
    out = [[float(v) for v in r + d] for r, d in zip(start, best)]
    return (out if all(math.isfinite(v) for r in out for v in r) else table), runs[0]


def _refine_chosen(denoise: Denoise, solver: Any, latents: torch.Tensor, result: CoefficientFitResult,
                   final: torch.Tensor, rows: int, iters: int, optimizer: str) -> int:
    """Refine ``result``'s accepted table (:func:`_refine_table`); keep it if it lowers the error of the sequential
    fit on the search latents and then on the held-out ones. Returns the model evaluations per latent."""
    fit_solver = type(solver).from_config(solver.config, searched_timesteps=result.timesteps)
    fit_solver.set_timesteps(len(result.timesteps), device=latents.device)
    table, runs = _refine_table(denoise, fit_solver, latents, result.coefficients, final, rows, iters, optimizer)
    x = _run_table(denoise, fit_solver, latents, table)
    err = pooled_error(x[:rows], final[:rows])
    result.unrefined_search_error, result.unrefined_held_out_error = result.search_error, result.held_out_error
    k = latents.shape[0] - rows
    reason, held, _ = held_out_verdict("refined table", "the sequential fit", err, result.search_error, k,
                                       lambda: (pooled_error(x[rows:], final[rows:]), result.held_out_error))
    if reason:
        result.refine_reason = reason
        logger.info("fit_coefficients: keeping the sequential fit: %s", reason)
    else:
        result.coefficients, result.search_error, result.held_out_error, result.refined = table, err, held, True
    # each run: the no-grad outputs, and the differentiable path's forward and backward (counted as one more)
    return (3 * runs + 1) * len(result.timesteps)


@torch.no_grad()
def fit_coefficients(
    denoise: Denoise,
    scheduler: Any,
    latents: torch.Tensor,
    num_inference_steps: int,
    *,
    reference: Sequence[torch.Tensor] | Callable[[int, float], torch.Tensor] | None = None,
    reference_denoise: Denoise | None = None,
    held_out: float | int | None = 0.5,
    grids: Sequence[Any] | str | None = None,
    solver_rows: int | Sequence[int] | None = None,
    ridge: float = 0.0,
    node_rounds: int = 0,
    refine_iters: int = 0,
    refine_optimizer: str = "lbfgs",
    fine_steps: int = 250,
    store: bool = True,
    progress: bool = True,
) -> CoefficientFitResult:
    """Fit the ``num_inference_steps``-step solver of ``scheduler`` to ``denoise`` (module docstring).

    Args:
        denoise: ``denoise(x, t)``: the raw model output (guidance applied).
        scheduler: a :class:`~samplers.DEISScheduler` or :class:`~samplers.DCSolverScheduler` (one model
            evaluation per step). Its schedule (a searched one included), solver options and DC ratios are the
            starting point and the baseline of the checks; a table already in its config is replaced.
        latents: ``x_T`` at the first timestep, ``(B, ...)``; the last ``held_out`` rows only check the result.
        reference: the teacher state after each step, for all rows: ``reference[i]`` (or ``reference(i,
            t_{i+1})``) at ``t_{i+1}``, the last at ``σ = 0`` (``t_{i+1} = -1``), e.g. an exact ODE solution. With
            ``grids`` it must be the callable. Default: one ``fine_steps``-step DDIM solve of ``reference_denoise or
            denoise``, uniform in ``log ρ`` and shared by every schedule (:class:`~samplers.fine_teacher.FineTeacher`;
            the state at a node: one partial DDIM step from the fine point above it).
        reference_denoise: the teacher model when it differs from ``denoise`` (quantization-aware: ``denoise``
            quantized, ``reference_denoise`` full precision).
        held_out: rows kept out of the fit (a fraction or a count; ``None``: no check).
        grids: other schedules to fit on besides the scheduler's own: timestep lists, dicts of grid options
            (``{"time_grid": "time", "time_grid_power": 2.0}``), or ``"auto"`` (:data:`AUTO_GRIDS`). Each is fitted
            and the lowest search error wins; its timesteps are stored as ``searched_timesteps`` with the table.
            A fitted solver is best on other nodes than its own solver (measured in docs/samplers.md).
        solver_rows: how many first steps keep the solver's own rows (the fit starts after them); a sequence
            tries each count on every schedule as one more candidate table. Default: 0, 1 and 2 (those below
            ``num_inference_steps``). Fitting the first steps can leave the
            samples further from the teacher at the end than the solver does, where keeping them does not
            (measured in docs/samplers.md).
        ridge: ``λ >= 0``; row ``i`` minimises ``|F δ - r|² + λ sum_j G_jj δ_j²`` for the change ``δ`` from the
            solver's own row (``G = FᵀF``). With ``λ = 0`` the table depends on the schedule only, not on the
            solver it starts from.
        node_rounds: rounds of a pattern search over the nodes of the best schedule found (module docstring), each
            trial a fit of its own (the shared teacher gives a moved node's state for one evaluation); 0: none.
            One round tries up to ``2 (num_inference_steps - 1)`` schedules. The best schedule it finds joins the
            others: its tables pass the same held-out check.
        refine_iters: iterations that refine the chosen table as a whole against the final samples (module
            docstring; 0: none). ``denoise`` must then be differentiable in ``x``; each iteration costs one to two
            sampling runs of all the latents with a backward pass, and memory for ``num_inference_steps`` model
            graphs. The refined table is kept if it beats the sequential fit on the search latents and then on the
            held-out ones (``result.refine_reason`` says why not).
        refine_optimizer: ``"lbfgs"`` (a smooth model) or ``"adam"`` (a quantized backbone, whose rounding stalls
            the L-BFGS line search; :data:`ADAM_LR` steps, the best iterate kept).
        store: write an accepted table into the config (``fitted_coefficients``/``fitted_timesteps``, and its
            schedule as ``searched_timesteps``; saved by ``save_pretrained``); the scheduler then uses it whenever it
            runs those timesteps from the start. A rejected fit removes an older table.

    Returns a :class:`CoefficientFitResult`.
    """
    if not _is_ours(scheduler):
        raise TypeError(f"fit_coefficients needs a samplers.DEISScheduler or DCSolverScheduler, got "
                        f"{type(scheduler).__name__} (build one with from_config(scheduler.config))")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 2:
        raise ValueError(f"fine_steps must be an int >= 2, got {fine_steps!r}")
    if isinstance(node_rounds, bool) or not isinstance(node_rounds, int) or node_rounds < 0:
        raise ValueError(f"node_rounds must be an int >= 0, got {node_rounds!r}")
    if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
        raise ValueError(f"refine_iters must be an int >= 0, got {refine_iters!r}")
    if refine_optimizer not in REFINE_OPTIMIZERS:
        raise ValueError(f"refine_optimizer must be one of {REFINE_OPTIMIZERS}, got {refine_optimizer!r}")
    if solver_rows is None:
        solver_rows = tuple(k for k in (0, 1, 2) if k < num_inference_steps)
    keeps = (solver_rows,) if isinstance(solver_rows, int) and not isinstance(solver_rows, bool) else solver_rows
    if (not isinstance(keeps, Sequence) or isinstance(keeps, (str, bytes)) or not keeps
            or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_inference_steps for k in keeps)):
        raise ValueError(f"solver_rows must be an int or a non-empty list of ints in [0, num_inference_steps), "
                         f"got {solver_rows!r}")
    keeps = sorted(set(keeps))
    if not isinstance(latents, torch.Tensor) or latents.ndim < 1:
        raise TypeError(f"latents must be a tensor (B, ...), got {type(latents).__name__}")
    if reference is not None and not callable(reference) and not isinstance(reference, Sequence):
        raise TypeError(f"reference must be None, a list of states or a callable (i, t) -> state, "
                        f"got {type(reference).__name__}")
    if grids == "auto":
        grids = AUTO_GRIDS
    if grids is not None and (isinstance(grids, (str, bytes, dict)) or not isinstance(grids, Sequence)):
        raise TypeError(f"grids must be None, 'auto' or a list of schedules, got {grids!r}")
    if grids and reference is not None and not callable(reference):
        raise ValueError("with grids, reference must be a callable (i, t) -> state (or None): a list of states "
                         "holds one schedule only")
    k = held_out_rows(latents.shape[0], held_out)
    rows = latents.shape[0] - k
    n = num_inference_steps
    # the solver the tables start from: the scheduler without its old table, on its own schedule
    solver = type(scheduler).from_config(scheduler.config, fitted_coefficients=None, fitted_timesteps=None)
    solver.set_timesteps(n, device=latents.device)
    if refine_iters:  # before the fit, not after its minutes
        _check_differentiable(denoise, latents, solver.timesteps[0], "refine_iters > 0")
    own_ts = [float(t) for t in solver.timesteps.double().cpu()]
    schedules = [own_ts] + [ts for ts in (_grid(solver, n, g) for g in grids or ()) if ts != own_ts]
    evals = 0
    teachers: dict[float, FineTeacher] = {}  # the default teacher, one per first timestep

    def fit_schedule(ts: list[float], show: bool) -> list[_Table]:
        """Every table of one schedule (one per ``solver_rows`` count), against the teacher's states at its nodes."""
        nonlocal evals
        fit_solver = type(solver).from_config(solver.config, searched_timesteps=ts)
        fit_solver.set_timesteps(n, device=latents.device)
        base = solver_coefficients(fit_solver, n)  # also refuses Runge-Kutta stages
        nodes = [float(t) for t in fit_solver.timesteps.double().cpu()]
        if reference is None:
            if nodes[0] not in teachers:
                teachers[nodes[0]] = FineTeacher(reference_denoise or denoise, solver.schedule, solver.convert_output,
                                                 latents, nodes[0], fine_steps, progress=show)
            teacher = teachers[nodes[0]]
            targets = [teacher.state(t) for t in nodes[1:]] + [teacher.final]
        else:
            targets = [_target(reference, i, nodes[i + 1] if i + 1 < n else -1.0) for i in range(n)]
        for i, y in enumerate(targets):
            if y.shape != latents.shape:
                raise ValueError(f"reference state {i} has shape {tuple(y.shape)}, latents {tuple(latents.shape)}")
        tables = []
        for keep in keeps:
            table, x = _fit_table(denoise, fit_solver, latents, base, targets, rows, ridge, keep, show)
            evals += n
            tables.append(_Table(pooled_error(x[:rows], targets[-1][:rows]), ts, table, x, targets[-1], base, keep))
        return tables

    found = [f for ts in schedules for f in fit_schedule(ts, progress)]
    refined_from = None
    if node_rounds:  # the nodes of the best schedule so far, moved with a fit at every trial
        start = min(found, key=lambda f: f.error)
        refined_from, tried = list(start.timesteps), {}

        def objective(ts: Sequence[float]) -> float:
            tables = tried[tuple(ts)] = fit_schedule([float(np.float32(t)) for t in ts], False)  # as scheduled
            return min(f.error for f in tables)

        best, _ = _refine(objective, noise_schedule_of(solver), refined_from, start.error, node_rounds, False,
                          progress)
        found += tried.get(tuple(best), [])  # nothing when no trial beat the start
    # the own schedule's teacher: shared by every schedule that starts at the same timestep (all of AUTO_GRIDS do); a
    # grid that starts elsewhere has a teacher of its own, and each table is checked against its own teacher below
    own_final = found[0].final
    base_x = run_sampler(denoise, solver, latents, n).to(torch.float64)
    evals += n
    search, check = slice(None, rows), slice(rows, None)
    base_err = pooled_error(base_x[search], own_final[search])
    base_held = pooled_error(base_x[check], own_final[check]) if k else None
    result = None
    # best search error first; a table that fails the held-out check gives way to the next schedule's (a steep grid
    # can fit the search latents best and still send a held-out latent astray)
    grid_errors = {}
    for f in found:
        grid_errors[tuple(f.timesteps)] = min(f.error, grid_errors.get(tuple(f.timesteps), math.inf))
    for err, ts, table, x, final, _, keep in sorted(found, key=lambda f: f.error):
        verdict = held_out_verdict("fitted table", "the solver", err, base_err, k,
                                   lambda x=x, final=final: (pooled_error(x[check], final[check]), base_held))
        if result is None or not verdict[0]:
            result = CoefficientFitResult(table, found[0].base, ts, not verdict[0], verdict[0], err, base_err,
                                          verdict[1], verdict[2], solver_rows=keep,
                                          grid_errors=[(list(t), e) for t, e in grid_errors.items()],
                                          candidates=[(f.timesteps, f.solver_rows, f.error) for f in found],
                                          nodes_refined_from=refined_from)
        if not verdict[0] or err >= base_err:  # accepted, or no later schedule can beat the solver either
            break
        logger.info("fit_coefficients: the table on %s (solver rows %d) is rejected (%s); trying the next one", ts,
                    keep, verdict[0])
    if refine_iters and result.accepted:
        evals += _refine_chosen(denoise, solver, latents, result, own_final, rows, refine_iters, refine_optimizer)
    ts, table = result.timesteps, result.coefficients
    result.model_evaluations = (evals + sum(t.evaluations for t in teachers.values())) * latents.shape[0]
    if not result.accepted:
        logger.warning("fit_coefficients: keeping the solver's own coefficients: %s", result.reason)
    if store:  # a rejected fit also removes an older table: the scheduler is left with what was checked
        if result.accepted and ts != own_ts:
            scheduler.set_searched_timesteps(ts)
        scheduler.register_to_config(fitted_coefficients=table if result.accepted else None,
                                     fitted_timesteps=ts if result.accepted else None)
        scheduler.set_timesteps(n, device=latents.device)
    return result
