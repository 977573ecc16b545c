"""DC ratio search and cascade polynomial regression (DC-Solver, ECCV 2024, Sec. 3.3-3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.dc_search import gmm_denoise, gmm_reference
from pipelines.gmm import GaussianMixture, GMMDenoiser
from samplers import CascadePolynomialRegression, DCSolverScheduler, ddim_reference, search_dc_ratios


@pytest.fixture(scope="module")
def problem():
    mix = GaussianMixture.random(3, 2, (2, 4, 4), seed=0)
    model = GMMDenoiser(mix)
    x_T = torch.randn(10, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x_T, torch.arange(10) % 3


def _final_rmse(sched, den, x_T, ref, n):
    sched.set_timesteps(n)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(den(x, t), t, x).prev_sample
    return (x - ref).pow(2).mean().sqrt().item()


def test_search_lowers_error_nfe5_cfg75(problem):
    """Against the exact PF-ODE states, the searched ratios give a strictly lower final error than ratios 1."""
    model, x_T, labels = problem
    den = gmm_denoise(model, labels, 7.5)
    sched = DCSolverScheduler()
    ref = gmm_reference(model, sched, x_T, labels, 7.5, 5)
    ratios, losses = search_dc_ratios(den, sched, x_T, 5, reference=ref, iters=20, progress=False)
    assert len(ratios) == len(losses) == 5 and ratios[:2] == [1.0, 1.0]
    assert all(0.5 < r < 1.5 for r in ratios)
    assert list(sched.config.dc_ratios) == ratios
    searched = _final_rmse(sched, den, x_T, ref[-1], 5)
    plain = _final_rmse(DCSolverScheduler(), den, x_T, ref[-1], 5)
    assert searched < 0.95 * plain


def test_ddim_reference_is_close_to_exact(problem):
    """The 250-step DDIM reference is within 2e-2 rms of the exact states (first-order, 250 steps)."""
    model, x_T, labels = problem
    den = gmm_denoise(model, labels, 2.0)
    sched = DCSolverScheduler()
    exact = gmm_reference(model, sched, x_T, labels, 2.0, 4)
    ddim = ddim_reference(den, sched, x_T, 4, fine_steps=250)
    for a, b in zip(exact, ddim):
        assert (a - b).pow(2).mean().sqrt() < 2e-2


def test_non_differentiable_denoiser_raises(problem):
    model, x_T, labels = problem
    null = torch.full_like(labels, 3)

    def detached(x, t):  # GMMDenoiser.forward detaches its input
        c, u = model(torch.cat([x, x]), t, torch.cat([labels, null])).sample.chunk(2)
        return u + 7.5 * (c - u)

    with pytest.raises(ValueError, match="differentiable"):
        search_dc_ratios(detached, DCSolverScheduler(), x_T, 5, reference=[x_T] * 5, progress=False)


def test_cpr_recovers_known_coefficients():
    """Ratios generated from known 36 coefficients on a (NFE, CFG) grid are fitted back to 1e-8."""
    rng = np.random.default_rng(0)
    true = rng.normal(scale=0.1, size=(4, 3, 3))
    true[0, 0, 0] += 1.0
    truth = CascadePolynomialRegression(true, (5, 10), (1.0, 9.0))
    samples = [(n, g, truth.predict(n, g)) for n in (5, 6, 8, 10) for g in (1.0, 3.0, 5.0, 7.5, 9.0)]
    fit = CascadePolynomialRegression.fit(samples)
    np.testing.assert_allclose(fit.coefficients, true, atol=1e-8)
    assert fit.nfe_range == (5, 10) and fit.guidance_range == (1.0, 9.0)
    assert fit.predict(7, 4.0)[:2] == [1.0, 1.0]


def test_cpr_range_and_json(tmp_path):
    coef = np.zeros((4, 3, 3))
    coef[0, 0, 0] = 1.0
    coef[1, 1, 0] = 0.2  # ρ = 1 + 0.2 s g
    m = CascadePolynomialRegression(coef, (5, 10), (2.0, 8.0))
    with pytest.raises(ValueError, match="outside the fitted range"):
        m.predict(20, 4.0)
    with pytest.raises(ValueError, match="outside the fitted range"):
        m.predict(6, 12.0)
    r = m.predict(20, 12.0, extrapolate=True)
    assert r[10] == pytest.approx(1 + 0.2 * 0.5 * 1.0)
    m.save(tmp_path / "cpr.json")
    back = CascadePolynomialRegression.load(tmp_path / "cpr.json")
    np.testing.assert_array_equal(back.coefficients, coef)
    s = DCSolverScheduler(cpr=m.to_dict(), cpr_guidance_scale=6.0)
    s.set_timesteps(6)
    assert s.dc_ratios == pytest.approx(m.predict(6, 6.0))
    with pytest.raises(ValueError, match="outside the fitted range"):
        s.set_timesteps(12)
    with pytest.raises(ValueError, match="36 finite floats"):
        DCSolverScheduler(cpr={"coefficients": [1.0] * 5, "nfe_range": [1, 2], "guidance_range": [1, 2]})
    with pytest.raises(ValueError, match=">= 3 distinct"):
        CascadePolynomialRegression.fit([(5, 1.0, [1.0] * 5), (6, 1.0, [1.0] * 6)])
