"""samplers.search_schedule (GITS DP + pattern search), its held-out rejection and storage; DC search robustness."""

from __future__ import annotations

import itertools
import logging

import diffusers
import numpy as np
import pytest
import torch

from pipelines.dc_search import gmm_denoise, gmm_reference
from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from samplers import DCSolverScheduler, DEISScheduler, run_sampler, search_dc_ratios, search_schedule
from samplers.schedule_search import _dp_path, _refine, held_out_rows, pooled_error, searched_timesteps_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")
VP = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def problem():
    model = GMMDenoiser(GaussianMixture.random(3, 2, (2, 4, 4), seed=0))
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    labels = torch.arange(16) % 3
    return model, x, labels, gmm_denoise(model, labels, 1.0), reference_sample(model, x, labels, 1.0)


def _rmse(a, b, rows=slice(None)):
    return float((a[rows].double() - b[rows].double()).pow(2).mean().sqrt())


def test_dp_path_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    m = 7
    cost = np.triu(rng.uniform(0.1, 1.0, (m, m)), 1)
    cost[cost == 0] = np.inf
    for steps in (1, 2, 3, 4):
        best = min(
            (sum(cost[a, b] for a, b in itertools.pairwise((0, *mid, m - 1))), (0, *mid, m - 1))
            for mid in itertools.combinations(range(1, m - 1), steps - 1)
        )
        path = _dp_path(cost, steps)
        assert tuple(path) == best[1]


def test_searched_unipc_schedule_beats_its_default_on_held_out_latents(problem, tmp_path):
    """At NFE 5 the searched schedule more than halves UniPC's error on latents the search never saw (exact
    reference), is stored in the config, survives save_pretrained, and is used only for 5 steps."""
    model, x, labels, den, ref = problem
    sched = DCSolverScheduler.from_config(VP)
    res = search_schedule(den, sched, x, 5, reference=ref, held_out=0.5, progress=False)
    assert res.accepted and res.reason == ""
    assert res.held_out_error < 0.25 * res.default_held_out_error  # RMSE below half
    assert sched.config.searched_timesteps == res.timesteps and res.timesteps[0] == 999.0
    # held-out rows, recomputed independently of the search's bookkeeping
    got = run_sampler(den, sched, x, 5)
    default = run_sampler(den, DCSolverScheduler.from_config(VP), x, 5)
    assert _rmse(got, ref, slice(8, None)) == pytest.approx(res.held_out_error**0.5, rel=1e-9)
    assert _rmse(got, ref, slice(8, None)) < 0.5 * _rmse(default, ref, slice(8, None))
    sched.save_pretrained(tmp_path)
    again = DCSolverScheduler.from_pretrained(tmp_path)
    again.set_timesteps(5)
    assert again.timesteps.double().tolist() == pytest.approx(res.timesteps, abs=1e-3)
    again.set_timesteps(6)
    plain = DCSolverScheduler.from_config(VP)
    plain.set_timesteps(6)
    assert torch.equal(again.timesteps, plain.timesteps)


def test_rejects_a_schedule_that_is_worse_on_held_out_latents(problem, caplog):
    """Held-out targets equal to the default grid's own output: every other schedule is worse there, so the search
    must keep the default, say why, and leave the config alone."""
    model, x, labels, den, ref = problem
    sched = DEISScheduler.from_config(VP)
    rigged = ref.clone()
    rigged[8:] = run_sampler(den, DEISScheduler.from_config(VP), x, 5)[8:]
    with caplog.at_level(logging.WARNING, logger="samplers.schedule_search"):
        res = search_schedule(den, sched, x, 5, reference=rigged, held_out=8, progress=False)
    assert not res.accepted and "worse than the default on 8 held-out latents" in res.reason
    assert res.default_held_out_error == pytest.approx(0.0, abs=1e-24)
    assert sched.config.searched_timesteps is None
    assert "keeping the default grid" in caplog.text


def test_diffusers_scheduler_with_timesteps(problem, tmp_path):
    model, x, labels, den, ref = problem
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(VP, timestep_spacing="trailing", final_sigmas_type="zero")
    res = search_schedule(den, dpm, x, 5, reference=ref, progress=False, refine_rounds=1)
    assert res.accepted and all(t == int(t) for t in dpm.config.searched_timesteps)
    assert res.held_out_error < res.default_held_out_error
    dpm.save_pretrained(tmp_path)
    again = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    kw = searched_timesteps_kwargs(again, 5)
    assert kw == {"timesteps": dpm.config.searched_timesteps} and searched_timesteps_kwargs(again, 6) == {}
    with pytest.raises(TypeError, match=r"UniPCMultistepScheduler.set_timesteps takes no `timesteps=`"):
        search_schedule(den, diffusers.UniPCMultistepScheduler.from_config(VP), x, 5, progress=False)


def test_quantization_aware_search_uses_the_reference_model(problem):
    """A 'quantized' model (outputs off by 3 %) searched against the exact model's trajectory ends closer to the exact
    model's samples than the same model on its default grid."""
    model, x, labels, den, ref = problem

    def noisy(xx, t):
        return 1.03 * den(xx, t)

    sched = DCSolverScheduler.from_config(VP)
    res = search_schedule(noisy, sched, x, 6, reference_denoise=den, progress=False)
    assert res.accepted
    exact = reference_sample(model, x, labels, 1.0)
    ours = run_sampler(noisy, sched, x, 6)
    default = run_sampler(noisy, DCSolverScheduler.from_config(VP), x, 6)
    assert _rmse(ours, exact, slice(8, None)) < 0.8 * _rmse(default, exact, slice(8, None))


def test_search_arguments_are_validated(problem):
    model, x, labels, den, ref = problem
    s = DEISScheduler.from_config(VP)
    with pytest.raises(ValueError, match=r"method must be one of \('dp', 'dp\+refine', 'refine'\), got 'adam'"):
        search_schedule(den, s, x, 5, method="adam")
    with pytest.raises(ValueError, match="num_inference_steps must be >= 2"):
        search_schedule(den, s, x, 1)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        search_schedule(den, s, x, 5.0)
    with pytest.raises(ValueError, match="reference has shape"):
        search_schedule(den, s, x, 5, reference=ref[:3])
    with pytest.raises(ValueError, match="grid_points must be an int >= 2"):
        search_schedule(den, s, x, 5, grid_points=1)
    with pytest.raises(ValueError, match=r"objective must be one of \('mse', 'geomean', 'median'\), got 'l1'"):
        search_schedule(den, s, x, 5, objective="l1")
    assert held_out_rows(16, 0.25) == 4 and held_out_rows(16, 3) == 3 and held_out_rows(16, None) == 0
    for bad in (0.0, 1.0, 16, 0):
        with pytest.raises(ValueError, match="must leave at least one search and one held-out row"):
            held_out_rows(16, bad)
    with pytest.raises(TypeError, match="held_out must be None"):
        held_out_rows(16, "half")
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="supports diffusers' VP schedulers"):
        search_schedule(den, flow, x, 5)


def test_dc_ratios_default_reference_and_held_out_rejection(problem, caplog):
    """Without `reference` the package's fine DDIM reference is used; held-out targets rigged to plain UniPC's own
    output make any non-trivial ratios worse there, so they are reset to 1 with a logged reason."""
    model, x, labels, den, ref = problem
    sched = DCSolverScheduler.from_config(VP)
    ratios, losses = search_dc_ratios(den, sched, x, 6, iters=5, progress=False)
    assert len(ratios) == 6 and len(losses) == 6 and sched.config.dc_ratios == ratios
    states = gmm_reference(model, DCSolverScheduler.from_config(VP), x, labels, 1.0, 6)
    states[-1] = states[-1].clone()
    states[-1][8:] = run_sampler(den, DCSolverScheduler.from_config(VP), x, 6)[8:]
    sched = DCSolverScheduler.from_config(VP)
    with caplog.at_level(logging.WARNING, logger="samplers.dc"):
        ratios, _ = search_dc_ratios(den, sched, x, 6, reference=states, iters=10, held_out=8, progress=False)
    assert ratios == [1.0] * 6 and sched.config.dc_ratios == [1.0] * 6
    assert "worse on 8 held-out latents" in caplog.text


def _unit_gaussian_ddim():
    """Data ~ N(0, I) under VP: the exact model is ε̂ = σ x, the PF-ODE leaves x unchanged (x_0 = x_T), and one DDIM
    step from angle θ = arctan(σ/α) to θ' multiplies x by cos(θ - θ'). After N steps x becomes c x with
    c = Π cos Δθ_i, largest (log cos is concave) for equal Δθ_i = θ_T / N."""
    sched = DEISScheduler.from_config(VP, deis_order=0)  # DDIM
    vp = sched.schedule

    def den(x, t):
        rho = float(vp.rho(float(t)))
        return x * (rho / np.sqrt(1 + rho**2))

    return sched, den, float(np.arctan(vp.rho(999.0)))


@pytest.mark.parametrize("objective", ["mse", "geomean", "median"])
def test_ddim_search_reaches_the_closed_form_optimum_on_unit_gaussian_data(objective):
    """Every latent's error (1 - c)² |x_b|² / d falls as c grows, so every objective has the equal-angle optimum, and
    its value is (1 - cos(θ_T/N)^N)² times the objective pooled over |x_b|² / d."""
    n = 5
    sched, den, theta_T = _unit_gaussian_ddim()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = search_schedule(den, sched, x, n, reference=x, held_out=None, grid_points=96, refine_rounds=8,
                          objective=objective, progress=False)
    per_latent = x.pow(2).mean(1).numpy()
    pooled = {"mse": per_latent.mean(), "geomean": np.exp(np.log(per_latent).mean()),
              "median": np.median(per_latent)}[objective]
    best = (1 - np.cos(theta_T / n) ** n) ** 2 * pooled
    assert res.accepted and res.objective == objective
    assert best * (1 - 1e-9) <= res.search_error <= best * 1.004
    assert res.default_search_error > 1.2 * best  # the default time^1.5 grid is clearly off the optimum
    thetas = np.arctan(sched.schedule.rho(np.array(res.timesteps)))
    assert thetas == pytest.approx(theta_T * (1 - np.arange(n) / n), abs=0.01)


def test_robust_objectives_ignore_a_latent_whose_target_is_far_off():
    """One of 8 targets is moved 30 units against its latent: its error (1 - c)² |x₀|² + 60 (1 - c) |x₀| + 900 falls
    as c shrinks, so the mean pulls the schedule off the optimum of the 7 clean latents. The median never sees that
    latent; under the geometric mean its log changes by about 60 (1 - c) |x₀| / 900, far less than the clean
    latents' 2 log(1 - c). The median keeps the exact equal-angle optimum; the geometric mean moves only slightly (the
    clean error is flat at its optimum, so any pull moves it a little)."""
    n = 4
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = x.clone()
    target[0] -= 30 * x[0] / x[0].norm()
    rows = slice(1, None)
    found = {}
    for objective in ("mse", "geomean", "median"):
        sched, den, theta_T = _unit_gaussian_ddim()
        found[objective] = search_schedule(den, sched, x, n, reference=target, held_out=None, grid_points=64,
                                           refine_rounds=6, objective=objective, progress=False)
        got = run_sampler(den, sched, x, n)
        c_best = np.cos(theta_T / n) ** n
        clean = _rmse(got, x, rows) / _rmse(c_best * x, x, rows)  # 1 at the optimum
        thetas = np.arctan(sched.schedule.rho(np.array(found[objective].timesteps)))
        if objective == "mse":
            assert clean > 2.0  # the mean is pulled far off (2.7x the clean optimum here)
        else:
            assert clean < (1.002 if objective == "median" else 1.05)
            if objective == "median":
                assert thetas == pytest.approx(theta_T * (1 - np.arange(n) / n), abs=0.01)
            assert found[objective].search_error == pytest.approx(pooled_error(got, target, objective), rel=1e-12)


def test_pooled_error_matches_numpy():
    a = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = torch.zeros_like(a)
    per = a.pow(2).reshape(6, -1).mean(1).numpy()
    assert pooled_error(a, b, "mse") == pytest.approx(float(a.pow(2).mean()), rel=1e-14)
    assert pooled_error(a, b, "geomean") == pytest.approx(float(np.exp(np.log(per).mean())), rel=1e-12)
    assert pooled_error(a, b, "median") == pytest.approx(float(np.median(per)), rel=1e-14)
    assert pooled_error(a[:5], b[:5], "median") == pytest.approx(float(np.median(per[:5])), rel=1e-14)
    a[0, 0, 0] = float("nan")
    assert pooled_error(a, b, "mse") == float("inf") and pooled_error(a, b, "geomean") == float("inf")
    assert pooled_error(a, b, "median") == pytest.approx(float(np.median(per[1:].tolist() + [np.inf])), rel=1e-14)
    tiny = torch.finfo(torch.float64).tiny  # exact zeros are floored there, so log stays finite
    assert pooled_error(b, b, "geomean") == pytest.approx(tiny, rel=1e-12)
    with pytest.raises(ValueError, match=r"objective must be one of \('mse', 'geomean', 'median'\), got 'max'"):
        pooled_error(a, b, "max")


def test_variant_search_keeps_the_best_solver_variant_and_its_config_survives(problem, tmp_path):
    """`variants=` refines each solver variant on the shared teacher; the lowest search error wins and is stored with
    the schedule, in memory (from_config of the config) and through save_pretrained."""
    model, x, labels, den, ref = problem
    sched = DEISScheduler.from_config(VP)
    bad = {"deis_method": "ipndm", "deis_order": 3, "deis_lower_order": False}
    good = {"deis_order": 2, "deis_lower_order": False}
    res = search_schedule(den, sched, x, 6, reference=ref, held_out=8, variants=[bad, good], progress=False)
    assert [c for c, _ in res.variant_errors] == [{}, bad, good]
    assert res.search_error == min(e for _, e in res.variant_errors)
    assert res.accepted and res.config == next(c for c, e in res.variant_errors if e == res.search_error)
    for key, value in res.config.items():
        assert sched.config[key] == value
    got = run_sampler(den, sched, x, 6)
    assert _rmse(got, ref, slice(8, None)) == pytest.approx(res.held_out_error**0.5, rel=1e-9)
    for again in (DEISScheduler.from_config(sched.config), None):
        if again is None:
            sched.save_pretrained(tmp_path)
            again = DEISScheduler.from_pretrained(tmp_path)
        assert torch.equal(run_sampler(den, again, x, 6), got)
    with pytest.raises(ValueError, match=r"variants of DEISScheduler may set \['deis_method', 'deis_order'"):
        search_schedule(den, sched, x, 6, variants=[{"time_grid": "rho"}])
    with pytest.raises(ValueError, match="deis_method not 'rhork'"):
        search_schedule(den, sched, x, 6, variants=[{"deis_method": "rhork"}])
    with pytest.raises(TypeError, match="variants must be None, 'auto' or a non-empty list"):
        search_schedule(den, sched, x, 6, variants={"deis_order": 2})
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(VP)
    with pytest.raises(ValueError, match="variants apply to"):
        search_schedule(den, dpm, x, 6, variants=[{"solver_order": 3}])


def test_settings_made_after_init_survive_an_in_memory_from_config():
    """diffusers' from_config drops keys listed in `_use_default_values`; a searched schedule, DC ratios or a solver
    variant set after __init__ must not be dropped (a DC-Solver built from a searched UniPC config lost its
    schedule)."""
    uni = DCSolverScheduler.from_config(VP)
    uni.set_searched_timesteps([999.0, 500.0, 100.0])
    uni.set_dc_ratios([1.0, 1.1, 0.9])
    uni.register_to_config(solver_order=3)
    again = DCSolverScheduler.from_config(uni.config)
    assert again.config.searched_timesteps == [999.0, 500.0, 100.0] and again.config.dc_ratios == [1.0, 1.1, 0.9]
    assert again.config.solver_order == 3
    again.set_timesteps(3)
    assert again.timesteps.tolist() == [999, 500, 100]


def test_refine_never_tries_nodes_that_meet_in_float32():
    """The pattern search halves its step each round; an objective that pulls node 2 onto node 1 drives the step
    below float32's spacing there. Every trial stays strictly decreasing in float32, the dtype the schedulers hold
    (a float64 step apart was once enough to make ``set_timesteps`` refuse the trial)."""
    sch = DEISScheduler.from_config(VP).schedule
    seen = []

    def objective(ts):
        t = np.asarray(ts, dtype=np.float32)
        assert np.all(np.diff(t) < 0), ts
        seen.append(ts)
        return abs(ts[1] - ts[2])

    ts0 = [999.0, 517.65, 400.0, 20.0]
    ts, err = _refine(objective, sch, ts0, objective(ts0), rounds=60, integer=False, progress=False)
    assert len(seen) > 60 and err < objective(ts0) and err == abs(ts[1] - ts[2])
    assert np.float32(ts[1]) > np.float32(ts[2]) and err < 1e-3
