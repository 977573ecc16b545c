"""DEIS math against closed forms: schedules, grids, quadrature, update plans and measured convergence orders."""

import math

import numpy as np
import pytest
import scipy.integrate
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from pipelines.gmm import GaussianMixture, GMMDenoiser
from samplers import DEISScheduler
from samplers.deis import IPNDM_WEIGHTS, multistep_plan, rk_plan, step_orders
from samplers.grids import flow_shift, log_rho_grid, power_grid, rho_power_grid, spacing_timesteps
from samplers.quadrature import lagrange_basis, lagrange_integrals, lagrange_integrals_dt
from samplers.schedules import FlowSchedule, VPSchedule, alphas_cumprod_from_config

F64 = torch.float64
VP_CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# schedules and grids


@pytest.mark.parametrize("cfg", VP_CONFIGS)
def test_alphas_cumprod_bit_identical_to_diffusers(cfg):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**cfg).alphas_cumprod.double().numpy()
    assert np.array_equal(alphas_cumprod_from_config(**cfg), ref)


@pytest.mark.parametrize("cfg", VP_CONFIGS)
def test_zero_terminal_snr_schedule(cfg):
    """Lin et al. 2024: identical to diffusers up to the clamped last ᾱ, which stays below its predecessor (diffusers'
    fixed 2⁻²⁴ does not for linear betas), so the schedule is valid and ρ(T-1) is the largest finite level."""
    from diffusers import EulerDiscreteScheduler

    cfg = {**cfg, "rescale_betas_zero_snr": True}
    ref = EulerDiscreteScheduler(**cfg).alphas_cumprod.double().numpy()
    ac = alphas_cumprod_from_config(**cfg)
    assert np.array_equal(ac[:-1], ref[:-1])
    assert ac[-1] == min(2.0**-24, ac[-2] ** 2 / ac[-3]) and 0 < ac[-1] < ac[-2]
    sch = VPSchedule(ac)  # raises unless strictly decreasing
    assert np.isfinite(sch.rho(999.0)) and sch.rho(999.0) > 1e3


@pytest.mark.parametrize("zero_snr", [False, True])
def test_cogvideox_snr_shift_schedule(zero_snr):
    """CogVideoX's snr_shift_scale s divides every SNR by s (before the zero-terminal-SNR rescale): the DEIS and
    DC-Solver schedules built from a CogVideoX scheduler's config match its float64 ᾱ (which it computes from float64
    betas: 3e-7 relative from ours in float32), and the betas reproduce that ᾱ."""
    from diffusers import CogVideoXDDIMScheduler

    from samplers import DCSolverScheduler, DEISScheduler
    from samplers.schedules import betas_from_config

    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "snr_shift_scale": 3.0,
           "rescale_betas_zero_snr": zero_snr, "prediction_type": "v_prediction"}
    src = CogVideoXDDIMScheduler(**cfg)
    ref = src.alphas_cumprod.double().numpy()
    plain = alphas_cumprod_from_config(**{k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end")})
    end = -1 if zero_snr else None  # the zero-SNR ᾱ_T = 0 is clamped (test_zero_terminal_snr_schedule)
    for cls in (DEISScheduler, DCSolverScheduler):
        sch = cls.from_config(src.config)
        ac = sch.alphas_cumprod.double().numpy()
        head = ref[:999]  # ρ = sqrt((1 - ᾱ) / ᾱ) up to t = 998 (ᾱ_999 is 0 with zero terminal SNR)
        np.testing.assert_allclose(sch.schedule.rho(np.arange(999.0))[:end], np.sqrt((1 - head) / head)[:end],
                                   rtol=1e-6)
        np.testing.assert_allclose(ac[:end], ref[:end], rtol=1e-6)
    if not zero_snr:  # SNR / 3 (up to float32 vs float64 betas, amplified by 1 - ᾱ ≈ 1e-3 at t = 0)
        np.testing.assert_allclose(ref / (1 - ref), plain / (1 - plain) / 3, rtol=1e-4)
    args = (1000, 0.00085, 0.012, "scaled_linear", None, zero_snr, 3.0)
    betas = betas_from_config(*args).double()
    np.testing.assert_allclose(torch.cumprod(1 - betas, 0).numpy(), alphas_cumprod_from_config(*args), rtol=1e-5)
    with pytest.raises(ValueError, match="snr_shift_scale must be a finite number > 0"):
        DEISScheduler(snr_shift_scale=0.0)


@pytest.mark.parametrize("cfg", VP_CONFIGS)
def test_vp_rho_matches_gmm_denoiser_and_inverts(cfg):
    sch = VPSchedule(alphas_cumprod_from_config(**cfg))
    model = GMMDenoiser(GaussianMixture.random(1, 1, (2,), seed=0), alphas_cumprod=DDPMScheduler(**cfg).alphas_cumprod)
    t = np.concatenate([np.arange(0, 1000, 37.0), np.random.default_rng(0).uniform(0, 999, 50)])
    np.testing.assert_allclose(sch.rho(t), model.rho(torch.from_numpy(t)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sch.t_of_rho(sch.rho(t)), t, atol=1e-8)
    # below t = 0: linear in ρ down to ρ = 0 at t = -1 (diffusers' final_alpha_cumprod = 1)
    assert sch.rho(-1.0) == 0.0 and sch.t_of_rho(0.0) == -1.0
    np.testing.assert_allclose(sch.t_of_rho(sch.rho(-0.3)), -0.3, atol=1e-12)
    # dρ/dt is the derivative of ρ(t) inside each piece
    tt = t[(t % 1 > 1e-3) & (t % 1 < 1 - 1e-3)]
    num = (sch.rho(tt + 1e-6) - sch.rho(tt - 1e-6)) / 2e-6
    np.testing.assert_allclose(sch.drho_dt(tt), num, rtol=1e-6)


def test_edm_schedule_closed_forms():
    """EDM in VP form: t = ln(ρ)/4 on [ln σ_min/4, ln σ_max/4], linear to ρ = 0 at t_min - 1; α = (1+ρ²)^-½."""
    from samplers.schedules import EDMSchedule

    sch = EDMSchedule(0.002, 700.0)
    assert sch.t_min == math.log(0.002) / 4 and sch.t_max == math.log(700.0) / 4 and sch.t_clean == sch.t_min - 1
    t = np.linspace(sch.t_clean, sch.t_max, 101)
    np.testing.assert_allclose(sch.t_of_rho(sch.rho(t)), t, atol=1e-12)
    inside = t[t > sch.t_min]
    np.testing.assert_allclose(sch.rho(inside), np.exp(4 * inside), rtol=1e-14)
    assert sch.rho(sch.t_clean) == 0.0 and sch.rho(sch.t_min) == pytest.approx(0.002, rel=1e-14)
    num = (sch.rho(t + 1e-7) - sch.rho(t - 1e-7)) / 2e-7
    keep = np.abs(t - sch.t_min) > 1e-6
    np.testing.assert_allclose(sch.drho_dt(t)[keep], num[keep], rtol=1e-6)
    a, s = sch.alpha_sigma(sch.rho(inside))
    np.testing.assert_allclose(a * a + s * s, 1.0, rtol=1e-14)
    bp = sch.breakpoints(sch.t_clean, sch.t_max)
    assert bp[0] == sch.t_clean and bp[-1] == sch.t_max and sch.t_min in bp
    assert np.all(np.diff(bp[bp >= sch.t_min]) <= 0.25 + 1e-12)  # ρ grows by at most e on a piece


def test_flow_schedule_closed_forms():
    sch = FlowSchedule(1000)
    s = np.array([0.0, 1e-9, 0.25, 0.5, 0.9, 1.0])
    rho = sch.rho(1000 * s)
    np.testing.assert_allclose(rho[:-1], s[:-1] / (1 - s[:-1]), rtol=1e-15)
    assert np.isinf(rho[-1])
    a, sig = sch.alpha_sigma(rho)
    np.testing.assert_allclose(a, 1 - s, rtol=1e-15, atol=0)
    np.testing.assert_allclose(sig, s, rtol=1e-15, atol=0)  # σ is accurate near 0 too (no 1 - α cancellation)
    np.testing.assert_allclose(sch.t_of_rho(rho), 1000 * s, rtol=1e-13)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 10, 25])
def test_spacing_matches_diffusers_multistep(spacing, n):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    got = spacing_timesteps(n, 1000, spacing, 1 if spacing == "leading" else 0)
    np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_grid_formulas():
    np.testing.assert_allclose(power_grid(999, 0, 4, 1.0), [999, 749.25, 499.5, 249.75])
    np.testing.assert_allclose(power_grid(1, 0, 4, 2.0), [1, 0.5625, 0.25, 0.0625])
    k = rho_power_grid(80.0, 0.002, 10, 7.0)
    assert k[0] == pytest.approx(80) and k[-1] == pytest.approx(0.002)
    np.testing.assert_allclose(np.diff(k ** (1 / 7)), np.diff(k ** (1 / 7))[0])  # uniform in ρ^(1/7)
    lg = log_rho_grid(80.0, 0.002, 10)
    np.testing.assert_allclose(np.diff(np.log(lg)), np.diff(np.log(lg))[0])
    # the static shift σ' = mσ/(1+(m-1)σ) is ρ' = mρ
    s = np.linspace(0.01, 0.99, 9)
    sh = flow_shift(s, 3.0)
    np.testing.assert_allclose(sh / (1 - sh), 3 * s / (1 - s), rtol=1e-13)


def test_flow_spacing_grid_matches_flowmatch_euler():
    ours = DEISScheduler.from_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        time_grid="spacing",
    )
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for n in (1, 4, 28):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        np.testing.assert_allclose(ours.timesteps.numpy(), ref.timesteps.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# quadrature and plans


def _quad_basis(nodes, j, a, b, sch):
    others = [x for i, x in enumerate(nodes) if i != j]

    def f(t):
        return np.prod([(t - x) / (nodes[j] - x) for x in others]) * float(sch.drho_dt(t))

    lo, hi = min(a, b), max(a, b)
    val = sum(
        scipy.integrate.quad(f, p, q, epsabs=0, epsrel=1e-13, limit=200)[0]
        for p, q in zip(sch.breakpoints(lo, hi)[:-1], sch.breakpoints(lo, hi)[1:])
    )
    return val if b >= a else -val


@pytest.mark.parametrize(
    "sch, nodes, a, b",
    [
        (VPSchedule(alphas_cumprod_from_config()), [700.0, 850.0, 999.0], 700.0, 500.5),
        (VPSchedule(alphas_cumprod_from_config()), [150.25, 310.0, 480.0, 700.0], 150.25, -1.0),
        (VPSchedule(alphas_cumprod_from_config(**VP_CONFIGS[1])), [40.0, 95.5], 40.0, 3.7),
        (FlowSchedule(1000), [985.0, 1000.0], 985.0, 960.0),  # history node at σ = 1 (ρ = ∞)
        (FlowSchedule(1000), [300.0, 520.0, 750.0, 999.0], 300.0, 0.0),
    ],
)
def test_tab_quadrature_matches_adaptive_quadrature(sch, nodes, a, b):
    got = lagrange_integrals_dt(np.array(nodes), a, b, sch)
    ref = np.array([_quad_basis(nodes, j, a, b, sch) for j in range(len(nodes))])
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # Σ_j ℓ_j = 1, so the coefficients sum to Δρ exactly
    assert got.sum() == pytest.approx(float(sch.rho(b) - sch.rho(a)), rel=1e-12)


def test_lagrange_integrals_closed_form():
    nodes = np.array([0.7, 1.1, 1.9, 2.6])
    a, b = 0.7, 0.2
    ref = [
        scipy.integrate.quad(lambda x, j=j: lagrange_basis(nodes, [x])[j, 0], a, b, epsrel=1e-14)[0] for j in range(4)
    ]
    np.testing.assert_allclose(lagrange_integrals(nodes, a, b), ref, rtol=1e-12)
    # uniform nodes reproduce the Adams-Bashforth weights (= iPNDM's)
    for r, w in enumerate(IPNDM_WEIGHTS):
        np.testing.assert_allclose(lagrange_integrals(-np.arange(r + 1.0), 0.0, 1.0), w, rtol=1e-13)


def test_step_orders_rule():
    assert step_orders(5, 3) == [0, 1, 1, 1, 1]  # degree ≤ 1 below 8 steps
    assert step_orders(10, 3) == [0, 1] + [2] * 8  # ≤ 2 below 15
    assert step_orders(15, 3) == [0, 1, 2] + [3] * 12
    assert step_orders(6, 2, lower_order=False) == [0, 1, 2, 2, 2, 2]
    assert step_orders(20, 3, start=10) == [0] * 11 + [1] + [2] * 8  # warm-up and caps count from `start`
    assert step_orders(1, 3) == [0]


def test_tab_last_step_is_the_rho_polynomial():
    sch = VPSchedule(alphas_cumprod_from_config())
    ts = power_grid(999, 0, 20, 1.5)
    tab, rab = (multistep_plan(sch, ts, m, 3) for m in ("tab", "rhoab"))
    assert tab.updates[-1] == rab.updates[-1] and tab.updates[-2] != rab.updates[-2]


def test_flow_first_step_is_the_ddim_limit_and_rhoab_drops_the_infinite_node():
    sch = FlowSchedule(1000)
    ts = np.array([1000.0, 750.0, 500.0, 250.0])
    for method in ("tab", "rhoab", "ipndm"):
        plan = multistep_plan(sch, ts, method, 3, lower_order=False)
        first = plan.updates[0]
        assert (first.anchor, first.eps, first.x0) == (0.0, (0.75,), (0.25,))  # x' = α' x̂0 + σ' ε
        assert all(math.isfinite(c) for u in plan.updates for c in (u.anchor, *u.eps, *u.x0))
    rab = multistep_plan(sch, ts, "rhoab", 3, lower_order=False)
    assert rab.updates[1].eps[1] == 0.0 and rab.updates[2].eps[2] == 0.0  # ρ = ∞ node carries no weight
    rk = rk_plan(sch, ts, 2)
    assert rk.updates[1].x0 and not rk.updates[1].eps  # first RK step runs on dz/dμ = x̂0
    # Heun's second stage sits at μ = 1/ρ_1 (c = 1); the midpoint of the final step at half its ρ
    assert len(rk.timesteps) == 2 * 4 and rk.timesteps[1] == 750.0
    assert rk.timesteps[-1] == pytest.approx(1000 * (1 / 6) / (1 + 1 / 6), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# measured convergence orders on an exact Gaussian problem
#
# Problem: one Gaussian in 8 dims, Σ = diag(λ), λ log-spaced in [0.3, 1], started at ρ0 = 0.6 (ε has curvature there;
# starting at large ρ makes the leading error term of ρ-space Adams-Bashforth nearly cancel, because ε is odd in ρ
# along a trajectory). Exact solution in y = x/α: y(ρ) - μ = sqrt((λ + ρ²)/(λ + ρ0²)) (y0 - μ).
# * tAB in t: rectified flow, where ρ(t) = s/(1-s) is analytic down to σ = 0, on a uniform-t grid. (VP's ρ(t) behaves
#   like sqrt(t+1) near σ = 0 and has kinks at integer t, which caps tAB's order there.)
# * ρAB and iPNDM: VP on a uniform-ρ grid (iPNDM's fixed weights are Adams-Bashforth only for uniform steps in ρ;
#   on other grids they are at most second order).
# * ρRK: rectified flow on a uniform-ρ grid (VP's final-step stages below ρ(t=0) would be clamped).
# Multistep methods start from exact values for their r warm-up steps (the standard way to measure a multistep
# method's order; a first-order warm-up step alone would cap every global order at 2).

LAM = torch.exp(torch.linspace(math.log(0.3), 0.0, 8, dtype=F64))
MU = torch.from_numpy(np.random.default_rng(0).standard_normal(8))
GAUSS = GaussianMixture(torch.ones(1, 1), MU[None, None], torch.eye(8, dtype=F64)[None, None], LAM[None, None], (8,))
RHO0 = 0.6


def _exact(y0, rho0, rho1):
    return MU + (y0 - MU) * torch.sqrt((LAM + rho1**2) / (LAM + rho0**2))


def _error(method, order, n):
    flow = method in ("tab", "rhork")
    kw = {"deis_method": method, "deis_order": order, "deis_lower_order": False}
    sched = DEISScheduler(prediction_type="flow_prediction", **kw) if flow else DEISScheduler(**kw)
    model = GMMDenoiser(GAUSS, "flow" if flow else "vp")
    if method == "tab":
        sched.set_timesteps(timesteps=1000 * RHO0 / (1 + RHO0) * (1 - np.arange(n) / n))
    else:
        rhos = RHO0 * (1 - np.arange(n) / n)
        sched.set_timesteps(sigmas=rhos / (1 + rhos) if flow else rhos)
    plan = sched._plan
    rho_start = float(plan.rhos[0])
    y0 = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 8)))
    x = float(plan.alphas[0]) * y0
    warm = 0 if method == "rhork" else order
    for k, t in enumerate(sched.timesteps):
        x = sched.step(model(x, t).sample, t, x).prev_sample
        if k < warm:  # exact starting values
            x = float(plan.alphas[k + 1]) * _exact(y0, rho_start, float(plan.rhos[k + 1]))
    return (x - _exact(y0, rho_start, 0.0)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "method, order, expected, ns",
    [("tab", r, r + 1, (16, 24, 32, 48)) for r in range(4)]
    + [(m, r, r + 1, (16, 24, 32, 48)) for m in ("rhoab", "ipndm") for r in range(4)]
    + [("rhork", p, p, (8, 12, 16, 24)) for p in range(1, 5)],
)
def test_measured_convergence_order(method, order, expected, ns):
    errors = [_error(method, order, n) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert abs(slope - expected) <= 0.3, (errors, slope)
