"""samplers.fit_coefficients: least-squares solver coefficients against teacher states, checked in closed form."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pipelines.dc_search import gmm_denoise, gmm_reference
from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from samplers import (
    DCSolverScheduler,
    DEISScheduler,
    FineTeacher,
    fit_coefficients,
    run_sampler,
    search_dc_ratios,
    search_schedule,
)
from samplers.coefficient_fit import REFINE_OPTIMIZERS
from samplers.linear_solver import solver_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")
VP = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _gaussian(sched, variance):
    """Data N(0, v I) per row (``variance``: (B,)): the exact ε-prediction, and the exact PF-ODE states.

    x̂0 = α v x / (α² v + σ²), and the ODE only rescales: x_t = x_T s(t) / s(t_0) with s = sqrt(α² v + σ²)."""
    sch = sched.schedule
    v = torch.as_tensor(variance, dtype=torch.float64)

    def alpha_sigma(t):
        a, s = sch.alpha_sigma(sch.rho(float(t)))
        return float(a), float(s)

    def denoise(x, t):
        a, s = alpha_sigma(t)
        vv = v.reshape(-1, *[1] * (x.ndim - 1))
        x0 = a * vv * x.double() / (a * a * vv + s * s)
        return ((x.double() - a * x0) / s).to(x.dtype)

    def states(x_T, n):
        sched.set_timesteps(n)
        ts = [float(t) for t in sched.timesteps.double()]
        vv = v.reshape(-1, *[1] * (x_T.ndim - 1))
        a0, s0 = alpha_sigma(ts[0])
        scale0 = torch.sqrt(a0 * a0 * vv + s0 * s0)
        out = []
        for t in ts[1:]:
            a, s = alpha_sigma(t)
            out.append(x_T.double() * torch.sqrt(a * a * vv + s * s) / scale0)
        out.append(x_T.double() * torch.sqrt(vv) / scale0)
        return out

    return denoise, states


def _gmm_problem(classes, components, shape, seed, latent_seed, guidance, latents=16):
    """``latents`` latents of a Gaussian mixture: the guided denoiser, the exact PF-ODE state ``(i, t) -> x_t``, and
    the mixture's model."""
    model = GMMDenoiser(GaussianMixture.random(classes, components, shape, seed=seed))
    x = torch.randn(latents, *shape, generator=torch.Generator().manual_seed(latent_seed), dtype=torch.float64)
    labels = torch.arange(latents) % classes

    def exact(i, t):
        return reference_sample(model, x, labels, guidance, t_end=max(float(t), 0.0))

    return x, gmm_denoise(model, labels, guidance), exact, model


def _mse(a, b):
    return float((a.double() - b.double()).pow(2).mean())


@pytest.mark.parametrize("cls, n", [(DCSolverScheduler, 4), (DEISScheduler, 5)])
def test_gaussian_data_is_solved_exactly(cls, n, tmp_path):
    """On Gaussian data every step's target is a combination of x_i and x̂0_i, so the fitted table is exact
    (the solver's own error is not), on held-out latents too; the stored table reproduces the fit's samples and
    survives save_pretrained."""
    sched = cls.from_config(VP)
    x = torch.randn(12, 2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((12,), 0.3))
    ref = states(x, n)
    res = fit_coefficients(denoise, sched, x, n, reference=ref, held_out=4, progress=False)
    assert res.accepted and res.reason == ""
    assert res.base_held_out_error > 1e-4
    assert res.held_out_error < 1e-20 and res.search_error < 1e-20
    assert res.base_coefficients == solver_coefficients(cls.from_config(VP), n)
    assert sched.config.fitted_coefficients == res.coefficients
    assert sched.config.fitted_timesteps == res.timesteps
    got = run_sampler(denoise, sched, x, n)
    assert _mse(got, ref[-1]) < 1e-20
    sched.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert torch.equal(run_sampler(denoise, again, x, n), got)


def test_the_teacher_can_be_another_model():
    """Quantization-aware: the fitted solver of a perturbed model (variance 0.36) meets the final samples of the
    teacher (variance 0.3, its default 250-step DDIM solve) exactly, far closer to the teacher's exact solution
    than an exact solve of the perturbed model gets."""
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    student, student_states = _gaussian(sched, torch.full((12,), 0.36))
    teacher, teacher_states = _gaussian(sched, torch.full((12,), 0.3))
    res = fit_coefficients(student, sched, x, 5, reference_denoise=teacher, held_out=4, progress=False)
    assert res.accepted
    got = run_sampler(student, sched, x, 5)
    ddim = FineTeacher(teacher, sched.schedule, sched.convert_output, x, 999.0, 250).final
    assert _mse(got, ddim) < 1e-20
    exact = teacher_states(x, 5)[-1]
    floor = _mse(student_states(x, 5)[-1], exact)  # the student's own exact ODE solution
    assert _mse(got, exact) == pytest.approx(_mse(ddim, exact), rel=1e-6)  # the teacher solve's own error
    assert _mse(got, exact) < 0.05 * floor


def _solver_states(denoise, sched, x, n):
    """The solver's own state after each step."""
    sched.set_timesteps(n)
    out, y = [], x.clone()
    for t in sched.timesteps:
        y = sched.step(denoise(y, t), t, y).prev_sample
        out.append(y)
    return out


def test_a_table_worse_on_held_out_latents_is_rejected(caplog):
    """The held-out rows' reference is the solver's own final sample, so any change of the coefficients is worse
    there: the table (exact on the search rows) is rejected, and an older table is removed from the config."""
    sched = DEISScheduler.from_config(VP)
    sched.register_to_config(fitted_coefficients=solver_coefficients(sched, 4),
                             fitted_timesteps=[999.0, 749.0, 499.0, 249.0])
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((8,), 0.3))
    ref = states(x, 4)
    ref[-1][4:] = run_sampler(denoise, DEISScheduler.from_config(VP), x, 4)[4:]
    with caplog.at_level(logging.WARNING, logger="samplers.coefficient_fit"):
        res = fit_coefficients(denoise, sched, x, 4, reference=ref, held_out=4, progress=False)
    assert res.search_error < 1e-20  # exact where it was fitted
    assert res.base_held_out_error == 0.0 < res.held_out_error
    assert not res.accepted and "held-out" in res.reason
    assert sched.config.fitted_coefficients is None and sched.config.fitted_timesteps is None
    assert "keeping the solver's own coefficients" in caplog.text


def test_a_solver_that_meets_its_reference_keeps_its_rows():
    """With the solver's own states as the reference every residual is zero: the rows do not move, and a table no
    better than the solver is not stored."""
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    denoise, _ = _gaussian(sched, torch.full((6,), 0.3))
    ref = _solver_states(denoise, DCSolverScheduler.from_config(VP), x, 4)
    res = fit_coefficients(denoise, sched, x, 4, reference=ref, held_out=2, progress=False)
    for got, own in zip(res.coefficients, res.base_coefficients):
        assert got == pytest.approx(own, abs=1e-12)
    assert not res.accepted and "no better" in res.reason
    assert sched.config.fitted_coefficients is None


def test_ridge_pulls_the_rows_to_the_solver():
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((6,), 0.3))
    ref = states(x, 4)
    free = fit_coefficients(denoise, sched, x, 4, reference=ref, held_out=None, store=False, progress=False)
    stiff = fit_coefficients(denoise, sched, x, 4, reference=ref, held_out=None, ridge=1e12, store=False,
                             progress=False)
    dist = [max(abs(a - b) for a, b in zip(r, s)) for r, s in zip(stiff.coefficients, stiff.base_coefficients)]
    assert max(dist) < 1e-9
    assert free.search_error < 1e-20 < stiff.search_error
    assert stiff.search_error == pytest.approx(stiff.base_search_error, rel=1e-6)
    assert sched.config.fitted_coefficients is None  # store=False


def test_gmm_fit_beats_the_searched_schedule_on_held_out_latents():
    """On a Gaussian mixture (exact reference), fitting the coefficients of UniPC on its searched NFE-5 schedule
    lowers the error on latents that neither the search nor the fit saw."""
    model = GMMDenoiser(GaussianMixture.random(3, 2, (2, 4, 4), seed=0))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(24, 2, 4, 4, generator=gen, dtype=torch.float64)
    x_eval = torch.randn(24, 2, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(24) % 3
    den = gmm_denoise(model, labels, 1.0)
    sched = DCSolverScheduler.from_config(VP)
    search_schedule(den, sched, x, 5, reference=gmm_reference(model, sched, x, labels, 1.0, 5)[-1], held_out=8,
                    progress=False)
    searched = DCSolverScheduler.from_config(sched.config)
    res = fit_coefficients(den, sched, x, 5, reference=gmm_reference(model, sched, x, labels, 1.0, 5), held_out=8,
                           progress=False)
    assert res.accepted
    exact = gmm_reference(model, sched, x_eval, labels, 1.0, 5)[-1]
    before = _mse(run_sampler(den, searched, x_eval, 5), exact)
    after = _mse(run_sampler(den, sched, x_eval, 5), exact)
    assert math.sqrt(after / before) < 0.75  # measured 0.62


def test_a_new_schedule_or_new_ratios_drop_the_table():
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((8,), 0.3))
    assert fit_coefficients(denoise, sched, x, 4, reference=states(x, 4), held_out=None, progress=False).accepted
    fitted = dict(sched.config)
    search_schedule(denoise, sched, x, 4, reference=states(x, 4)[-1], held_out=None, method="refine",
                    refine_rounds=1, progress=False)
    assert sched.config.fitted_coefficients is None
    other = DCSolverScheduler.from_config(fitted)
    with torch.enable_grad():
        search_dc_ratios(denoise, other, x, 4, reference=states(x, 4), iters=1, held_out=None, progress=False)
    assert other.config.fitted_coefficients is None


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"ridge": -1.0}, ValueError, "ridge"),
    ({"ridge": math.inf}, ValueError, "ridge"),
    ({"fine_steps": 0}, ValueError, "fine_steps"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"reference": 3.0}, TypeError, "reference"),
    ({"reference": [torch.zeros(2, 3)] * 4}, ValueError, "shape"),
    ({"held_out": 8}, ValueError, "held_out"),
    ({"solver_rows": -1}, ValueError, "solver_rows"),
    ({"solver_rows": 4}, ValueError, "solver_rows"),
    ({"solver_rows": ()}, ValueError, "solver_rows"),
    ({"solver_rows": True}, ValueError, "solver_rows"),
    ({"solver_rows": "1"}, ValueError, "solver_rows"),
    ({"solver_rows": (0, 1.5)}, ValueError, "solver_rows"),
])
def test_bad_arguments_are_refused(kwargs, exc, match):
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    denoise, _ = _gaussian(sched, torch.full((8,), 0.3))
    args = {"num_inference_steps": 4, **kwargs}
    n = args.pop("num_inference_steps")
    with pytest.raises(exc, match=match):
        fit_coefficients(denoise, sched, x, n, progress=False, **args)
    assert sched.config.fitted_coefficients is None


def test_diffusers_schedulers_are_refused():
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(TypeError, match="DEISScheduler or DCSolverScheduler"):
        fit_coefficients(lambda x, t: x, DPMSolverMultistepScheduler.from_config(VP), torch.zeros(4, 2), 4)


def test_grids_fit_each_schedule_and_keep_the_best():
    """``grids``: every schedule is fitted against the exact states at its own nodes, the lowest search error wins,
    and the winner's schedule is stored with its table (the scheduler then runs both for that step count)."""
    x, den, exact, _ = _gmm_problem(3, 2, (2, 4, 4), 0, 12, 1.0)
    grids = [{"time_grid": "time", "time_grid_power": 2.0}, {"time_grid": "log_rho"}, [999.0, 600.0, 300.0, 80.0]]
    sched = DCSolverScheduler.from_config(VP)
    res = fit_coefficients(den, sched, x, 4, reference=exact, grids=grids, held_out=None, progress=False)
    own = DCSolverScheduler.from_config(VP)
    own.set_timesteps(4)
    assert len(res.grid_errors) == 4 and res.grid_errors[0][0] == [float(t) for t in own.timesteps.double()]
    assert res.grid_errors[3][0] == [999.0, 600.0, 300.0, 80.0]
    assert res.search_error == min(e for _, e in res.grid_errors) < res.base_search_error
    assert res.accepted and res.timesteps == min(res.grid_errors, key=lambda g: g[1])[0]
    assert [float(t) for t in sched.timesteps.double()] == res.timesteps  # stored: schedule and table
    got = run_sampler(den, sched, x, 4)
    assert _mse(got, exact(3, -1.0)) == pytest.approx(res.search_error, rel=1e-9)
    with pytest.raises(ValueError, match="reference must be a callable"):
        fit_coefficients(den, sched, x, 4, reference=[x] * 4, grids=grids, progress=False)
    with pytest.raises(ValueError, match="each entry of grids"):
        fit_coefficients(den, sched, x, 4, reference=exact, grids=[[999.0, 500.0]], progress=False)
    with pytest.raises(TypeError, match="grids must be"):
        fit_coefficients(den, sched, x, 4, reference=exact, grids="all", progress=False)


def test_a_grid_whose_table_fails_the_held_out_check_gives_way_to_the_next_best():
    """The schedule with the lowest search error is rejected on the held-out latents (their teacher is moved away on
    that schedule only): the next schedule by search error is checked, passes, and is stored."""
    x, den, exact, _ = _gmm_problem(3, 2, (2, 4, 4), 0, 12, 1.0)
    grids = [{"time_grid": "time", "time_grid_power": 2.0}, {"time_grid": "log_rho"}, [999.0, 600.0, 300.0, 80.0]]

    first = fit_coefficients(den, DCSolverScheduler.from_config(VP), x, 4, reference=exact, grids=grids,
                             held_out=8, progress=False)
    ranked = sorted(first.grid_errors, key=lambda g: g[1])
    assert first.accepted and first.timesteps == ranked[0][0] != first.grid_errors[0][0]  # not the own schedule
    last_nodes = {}

    def moved(i, t):  # the held-out rows' final teacher is far off on the winning schedule only
        if t >= 0:
            last_nodes["t"] = float(t)
            return exact(i, t)
        y = exact(i, t).clone()
        if last_nodes["t"] == ranked[0][0][-1]:
            y[8:] += 10.0
        return y

    assert ranked[0][0][-1] not in [g[0][-1] for g in ranked[1:]]  # its last node tells the schedule apart
    sched = DCSolverScheduler.from_config(VP)
    res = fit_coefficients(den, sched, x, 4, reference=moved, grids=grids, held_out=8, progress=False)
    assert res.grid_errors == first.grid_errors  # the search rows' fits are unchanged
    assert res.accepted and res.timesteps == ranked[1][0] and res.search_error == ranked[1][1]
    assert res.held_out_error < res.base_held_out_error
    assert sched.config.fitted_timesteps == ranked[1][0]


def test_solver_rows_keep_the_first_steps_and_the_rest_is_fitted_exactly():
    """``solver_rows=2``: the first two rows are the solver's own, bit for bit. On Gaussian data the later steps
    still bring every latent onto the exact final sample (their targets stay in the span of x_i and x̂0_i)."""
    sched = DEISScheduler.from_config(VP)
    x = torch.randn(12, 2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((12,), 0.3))
    ref = states(x, 5)
    res = fit_coefficients(denoise, sched, x, 5, reference=ref, held_out=4, solver_rows=2, progress=False)
    assert res.accepted and res.solver_rows == 2
    assert res.coefficients[:2] == res.base_coefficients[:2] and res.coefficients[2:] != res.base_coefficients[2:]
    assert res.search_error < 1e-20 and res.held_out_error < 1e-20 < res.base_held_out_error
    assert [c[1] for c in res.candidates] == [2]


def test_each_solver_rows_count_is_one_more_candidate():
    """``solver_rows=(0, 1, 2)`` fits three tables on every schedule; the lowest search error wins, and its first
    ``solver_rows`` rows are the solver's. ``grid_errors`` holds each schedule's best."""
    x, den, exact, _ = _gmm_problem(2, 4, (3, 4, 4), 2, 3, 2.0)
    grids = [{"time_grid": "log_rho"}]
    res = fit_coefficients(den, DEISScheduler.from_config(VP), x, 5, reference=exact, grids=grids, held_out=None,
                           solver_rows=(2, 0, 1), progress=False)
    assert [c[1] for c in res.candidates] == [0, 1, 2, 0, 1, 2]
    assert res.search_error == min(c[2] for c in res.candidates)
    own = solver_coefficients(DEISScheduler.from_config(VP, searched_timesteps=res.timesteps), 5)
    assert res.coefficients[:res.solver_rows] == own[:res.solver_rows]
    assert res.coefficients[res.solver_rows:] != own[res.solver_rows:]
    for ts, err in res.grid_errors:
        assert err == min(c[2] for c in res.candidates if c[0] == ts)
    alone = fit_coefficients(den, DEISScheduler.from_config(VP), x, 5, reference=exact, grids=grids, held_out=None,
                             solver_rows=res.solver_rows, progress=False, store=False)
    assert alone.search_error == res.search_error and alone.coefficients == res.coefficients


def test_the_default_solver_rows_fit_short_schedules():
    """With one or two steps the default tries only the counts below the step count: one step has a single table
    (fitted from the start), two steps two; on Gaussian data each is exact."""
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    denoise, states = _gaussian(sched, torch.full((8,), 0.3))
    for n in (1, 2):
        res = fit_coefficients(denoise, DCSolverScheduler.from_config(VP), x, n, reference=states(x, n),
                               held_out=None, progress=False)
        assert [c[1] for c in res.candidates] == list(range(n))
        assert res.accepted and res.search_error < 1e-20


def test_node_search_moves_the_fitted_schedule_and_pays_on_new_latents():
    """``node_rounds`` starts from the best schedule of the plain fit, and the schedule it finds beats every fixed
    grid on the search latents, the held-out ones and fresh ones (measured: fresh RMSE 0.092 -> 0.061 in one round;
    the errors are heavy-tailed, a latent near a component boundary weighs as much as the rest)."""
    x, den, exact, model = _gmm_problem(3, 2, (2, 4, 4), 0, 12, 2.0, latents=48)
    fits = {}
    for rounds in (0, 1):
        sched = DCSolverScheduler.from_config(VP)
        fits[rounds] = sched, fit_coefficients(den, sched, x, 5, reference=exact, held_out=16, grids="auto",
                                               node_rounds=rounds, progress=False)
    (plain_sched, plain), (sched, res) = fits[0], fits[1]
    assert plain.nodes_refined_from is None and plain.accepted and res.accepted
    assert res.nodes_refined_from == min(plain.candidates, key=lambda c: c[2])[0]
    fixed = [ts for ts, _ in plain.grid_errors]
    assert res.timesteps not in fixed and [res.timesteps, res.search_error] in [list(g) for g in res.grid_errors]
    assert res.search_error < plain.search_error and res.held_out_error < plain.held_out_error
    assert _mse(run_sampler(den, sched, x, 5)[:32], exact(4, -1.0)[:32]) == pytest.approx(res.search_error, rel=1e-9)
    fresh = torch.randn(480, 2, 4, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    fresh_labels = torch.arange(480) % 3
    truth = reference_sample(model, fresh, fresh_labels, 2.0)
    before, after = (_mse(run_sampler(gmm_denoise(model, fresh_labels, 2.0), s, fresh, 5), truth)
                     for s in (plain_sched, sched))
    assert after < 0.8 * before


@pytest.mark.parametrize("bad", [-1, True, 2.0, "1"])
def test_node_rounds_is_checked(bad):
    with pytest.raises(ValueError, match="node_rounds"):
        fit_coefficients(lambda x, t: x, DCSolverScheduler.from_config(VP), torch.zeros(4, 8, dtype=torch.float64),
                         4, node_rounds=bad, progress=False)


def test_one_teacher_serves_every_schedule_and_node_trial():
    """The default teacher is solved once, ``fine_steps`` evaluations, for the seven schedules of ``grids="auto"``
    and every node-search trial (their nodes' states come from the kept outputs); ``model_evaluations`` counts the
    teacher's calls and the student's."""
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    den, _ = _gaussian(sched, torch.linspace(0.2, 0.6, 8))
    calls = {"student": 0, "teacher": 0}

    def counted(who):
        def f(y, t):
            calls[who] += 1
            return den(y, t)
        return f

    res = fit_coefficients(counted("student"), sched, x, 4, reference_denoise=counted("teacher"), held_out=3,
                           grids="auto", node_rounds=1, fine_steps=60, progress=False)
    assert res.nodes_refined_from is not None
    assert calls["teacher"] == 60
    assert calls["student"] >= 7 * 3 * 4 + 4  # three fits of 4 steps on each of 7 schedules, and the solver's run
    assert res.model_evaluations == (calls["teacher"] + calls["student"]) * 8


def test_refinement_is_kept_when_it_beats_the_sequential_fit_on_held_out_latents():
    """``refine_iters``: the whole table, refined by L-BFGS on the final error of the search latents, is kept when
    it also beats the sequential fit on the held-out ones; the stored table reproduces its search error."""
    x, den, exact, _ = _gmm_problem(3, 2, (2, 4, 4), 0, 12, 2.0, latents=32)
    sched = DCSolverScheduler.from_config(VP)
    res = fit_coefficients(den, sched, x, 4, reference=exact, held_out=8, refine_iters=20, progress=False)
    assert res.accepted and res.refined and res.refine_reason == ""
    assert res.search_error < 0.5 * res.unrefined_search_error
    assert res.held_out_error < 0.5 * res.unrefined_held_out_error
    assert _mse(run_sampler(den, sched, x, 4)[:24], exact(3, -1.0)[:24]) == pytest.approx(res.search_error, rel=1e-9)


def test_a_refinement_worse_on_held_out_latents_is_dropped():
    """A refined table that lowers the search error but raises the held-out one gives way to the sequential fit."""
    x, den, exact, _ = _gmm_problem(4, 3, (1, 4, 4), 1, 5, 4.0, latents=24)
    fits = {}
    for iters in (0, 20):
        sched = DCSolverScheduler.from_config(VP)
        fits[iters] = fit_coefficients(den, sched, x, 4, reference=exact, held_out=8, refine_iters=iters,
                                       progress=False)
    res = fits[20]
    assert res.accepted and not res.refined
    assert res.refine_reason.startswith("refined table is worse than the sequential fit on 8 held-out latents")
    assert res.coefficients == fits[0].coefficients and res.search_error == res.unrefined_search_error
    assert res.model_evaluations > fits[0].model_evaluations


def test_refinement_cannot_improve_an_exact_table():
    """On Gaussian data the sequential fit is exact, so the refinement finds nothing better and is dropped."""
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den, _ = _gaussian(sched, torch.linspace(0.1, 0.9, 12))
    res = fit_coefficients(den, sched, x, 4, held_out=4, refine_iters=5, fine_steps=40, progress=False)
    assert res.accepted and not res.refined
    assert res.refine_reason.startswith("refined table is no better than the sequential fit on the search latents")


def _rounded_input(denoise, step):
    """``denoise`` on its input rounded to multiples of ``step``, with the straight-through derivative: a model whose
    final error is piecewise constant in the table, as a quantized backbone's is."""
    def f(y, t):
        return denoise(y + (torch.round(y / step) * step - y).detach(), t)
    return f


def test_adam_descends_where_the_lbfgs_line_search_stalls():
    """``refine_optimizer``: on a model with rounded inputs L-BFGS stalls and Adam goes further with the same
    iterations; on the smooth model L-BFGS goes further. Each kept table reproduces its search error."""
    x, den, exact, _ = _gmm_problem(3, 2, (2, 4, 4), 0, 12, 2.0, latents=32)
    found = {}
    for model, d in (("smooth", den), ("rounded", _rounded_input(den, 0.05))):
        for opt in REFINE_OPTIMIZERS:
            sched = DCSolverScheduler.from_config(VP)
            res = fit_coefficients(d, sched, x, 4, reference=exact, held_out=8, refine_iters=60,
                                   refine_optimizer=opt, progress=False)
            assert res.accepted and res.refined
            assert res.search_error < res.unrefined_search_error
            assert _mse(run_sampler(d, sched, x, 4)[:24], exact(3, -1.0)[:24]) == pytest.approx(res.search_error,
                                                                                               rel=1e-9)
            found[model, opt] = res.search_error
    assert found["rounded", "adam"] < 0.95 * found["rounded", "lbfgs"]
    assert found["smooth", "lbfgs"] < 0.5 * found["smooth", "adam"]


@pytest.mark.parametrize("bad", ["sgd", "LBFGS", None, 1])
def test_refine_optimizer_is_checked(bad):
    sched = DCSolverScheduler.from_config(VP)
    den, _ = _gaussian(sched, torch.full((4,), 0.3))
    with pytest.raises(ValueError, match=r"refine_optimizer must be one of \('lbfgs', 'adam'\)"):
        fit_coefficients(den, sched, torch.randn(4, 16, dtype=torch.float64), 3, refine_iters=2,
                         refine_optimizer=bad, progress=False)


def test_refinement_needs_a_differentiable_model():
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den, _ = _gaussian(sched, torch.full((6,), 0.3))
    with pytest.raises(ValueError, match=r"refine_iters > 0 back-propagates"):
        fit_coefficients(lambda y, t: den(y, t).detach(), sched, x, 3, held_out=2, refine_iters=3, progress=False)


@pytest.mark.parametrize("bad", [-1, True, 2.5, "3"])
def test_refine_iters_is_checked(bad):
    sched = DCSolverScheduler.from_config(VP)
    den, _ = _gaussian(sched, torch.full((4,), 0.3))
    with pytest.raises(ValueError, match="refine_iters must be an int >= 0"):
        fit_coefficients(den, sched, torch.randn(4, 16, dtype=torch.float64), 3, refine_iters=bad, progress=False)
