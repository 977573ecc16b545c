"""DCSolverScheduler: exact UniPC reproduction, compensation, diffusers contract details (DC-Solver, ECCV 2024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from pipelines.dc_search import gmm_denoise
from pipelines.gmm import GaussianMixture, GMMDenoiser
from samplers import DCSolverScheduler
from samplers.dc import compensation_weights


@pytest.fixture(scope="module")
def gmm():
    mix = GaussianMixture.random(3, 2, (2, 4, 4), seed=0)
    model = GMMDenoiser(mix)
    x_T = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(8) % 3
    return model, x_T, labels


def _run(sched, denoise, x_T, states=None):
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(denoise(x, t), t, x).prev_sample
        if states is not None:
            states.append(x)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("n", [5, 8])
def test_ratios_one_reproduce_diffusers_unipc(gmm, order, solver_type, n):
    """All ratios 1 = diffusers' UniPC (same order/B(h)/timesteps, zero final sigma) on a guided GMM trajectory.

    diffusers keeps its σ in float32 (relative error ~1e-7, amplified to ~1e-5 by CFG 7.5), so its ``sigmas`` are
    replaced by the float64 values of the same schedule; the update arithmetic is then compared at 1e-10. For bh1
    diffusers' last step is NaN (−∞·0 at σ = 0), so only the intermediate states are compared there, and ours must
    stay finite."""
    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 7.5)
    ref = UniPCMultistepScheduler(solver_order=order, solver_type=solver_type, timestep_spacing="trailing",
                                  final_sigmas_type="zero")
    ref.set_timesteps(n)
    ours = DCSolverScheduler(solver_order=order, solver_type=solver_type, dc_ratios=[1.0] * n)
    ours.set_timesteps(timesteps=ref.timesteps)
    ref.sigmas = torch.from_numpy(np.append(ours.schedule.rho(ref.timesteps.double().numpy()), 0.0))
    a, b = [], []
    _run(ref, den, x_T, a)
    _run(ours, den, x_T, b)
    for i in range(n - 1):
        assert torch.allclose(a[i], b[i], atol=1e-10, rtol=0), i
    assert torch.isfinite(b[-1]).all()
    if solver_type == "bh2":
        assert torch.allclose(a[-1], b[-1], atol=1e-10, rtol=0)
    else:
        assert torch.isnan(a[-1]).any()  # the diffusers bug this scheduler avoids


def test_float32_sigmas_match_diffusers_to_1e5(gmm):
    """Without the float64 patch (both as shipped), a guided 8-step bh2 order-2 run agrees to 1e-4 / 1e-5 rms."""
    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 2.0)
    ref = UniPCMultistepScheduler(solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero")
    ref.set_timesteps(8)
    ours = DCSolverScheduler(solver_order=2)
    ours.set_timesteps(timesteps=ref.timesteps)
    d = _run(ref, den, x_T) - _run(ours, den, x_T)
    assert d.pow(2).mean().sqrt() < 1e-5


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh1_zero_final_sigma_no_nan(gmm, order):
    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 7.5)
    for n in (1, 2, 3, 4, 10):
        for corrector in (True, False):
            s = DCSolverScheduler(solver_order=order, solver_type="bh1", corrector=corrector, lower_order_final=False)
            s.set_timesteps(n)
            assert float(s.sigmas[-1]) == 0.0
            assert torch.isfinite(_run(s, den, x_T)).all()


def test_compensation_weights_are_lagrange():
    """ℓ_j(τ) reproduces quadratics exactly at τ = t_{i-1} + ρ (t_i - t_{i-1}); ρ = 1 is the identity."""
    nodes = [200.0, 400.0, 600.0]  # newest first
    assert compensation_weights(nodes, 1.0) == pytest.approx([1.0, 0.0, 0.0])
    for rho in (0.7, 1.3):
        tau = 400.0 + rho * (200.0 - 400.0)
        w = compensation_weights(nodes, rho)
        f = [3 - 0.01 * t + 2e-5 * t * t for t in nodes]
        assert sum(a * b for a, b in zip(w, f)) == pytest.approx(3 - 0.01 * tau + 2e-5 * tau * tau, rel=1e-12)


def test_compensation_replaces_the_newest_output(gmm):
    """With a ratio ≠ 1 only from step dc_order on, earlier states equal plain UniPC and later ones differ."""
    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 7.5)
    ratios = [1.3] * 6
    a, b = [], []
    _run(_set(DCSolverScheduler(), 6), den, x_T, a)
    _run(_set(DCSolverScheduler(dc_ratios=ratios), 6), den, x_T, b)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[2], b[2])


def test_predictor_only_matches_dpmsolver_2m(gmm):
    """corrector=False, order 2, bh2 is DPM-Solver++(2M) (UniPC paper, Sec. 3.2; reference §3)."""
    from diffusers import DPMSolverMultistepScheduler

    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 4.0)
    ref = DPMSolverMultistepScheduler(solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero")
    ref.set_timesteps(6)
    ours = DCSolverScheduler(corrector=False)
    ours.set_timesteps(timesteps=ref.timesteps)
    ref.sigmas = torch.from_numpy(np.append(ours.schedule.rho(ref.timesteps.double().numpy()), 0.0))
    assert torch.allclose(_run(ref, den, x_T), _run(ours, den, x_T), atol=1e-10)


def _set(s, n):
    s.set_timesteps(n)
    return s


def test_ratios_round_trip_save_load(tmp_path):
    s = DCSolverScheduler(solver_order=3, dc_ratios=[1.0, 1.0, 0.9, 1.1, 1.2], disable_corrector=[0])
    s.save_pretrained(tmp_path)
    t = DCSolverScheduler.from_pretrained(tmp_path)
    assert list(t.config.dc_ratios) == [1.0, 1.0, 0.9, 1.1, 1.2]
    t.set_timesteps(5)
    assert t.dc_ratios == [1.0, 1.0, 0.9, 1.1, 1.2]
    s.set_dc_ratios([1.0, 1.0, 1.05, 1.0, 0.95])
    s.save_pretrained(tmp_path)
    assert list(DCSolverScheduler.from_pretrained(tmp_path).config.dc_ratios)[2] == 1.05


def test_from_config_of_sd_and_flow_configs(gmm):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    sd = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       prediction_type="v_prediction")
    s = DCSolverScheduler.from_config(sd.config, dc_ratios=[1.0, 1.0, 1.1, 1.0])
    s.set_timesteps(4)
    assert s.config.prediction_type == "v_prediction" and s.config.beta_schedule == "scaled_linear"
    f = DCSolverScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert f.config.prediction_type == "flow_prediction"
    f.set_timesteps(5)
    x = torch.randn(2, 3)
    for t in f.timesteps:
        x = f.step(torch.randn(2, 3), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_fp16_model_output_keeps_fp32_state(gmm):
    model, x_T, labels = gmm
    den = gmm_denoise(model, labels, 2.0)
    a = _set(DCSolverScheduler(dc_ratios=[1.0, 1.0, 1.2, 0.9, 1.1]), 5)
    b = _set(DCSolverScheduler(dc_ratios=[1.0, 1.0, 1.2, 0.9, 1.1]), 5)
    x32, x16 = x_T.float(), x_T.float()
    for t in a.timesteps:
        x32 = a.step(den(x32, t), t, x32).prev_sample
        x16 = b.step(den(x16, t).half(), t, x16).prev_sample
        assert b._history[0].dtype == torch.float32
    assert x16.dtype == torch.float32 and (x16 - x32).pow(2).mean().sqrt() < 1e-2  # fp16 rounding of the output


def test_invalid_ratios_raise():
    s = DCSolverScheduler(dc_ratios=[1.0, 1.0, 1.1])
    with pytest.raises(ValueError, match="one ratio per step"):
        s.set_timesteps(5)
    with pytest.raises(ValueError, match="dc_ratios must be finite"):
        DCSolverScheduler(dc_ratios=[1.0, float("nan")])
    with pytest.raises(ValueError, match=r"solver_order must be one of \[1, 2, 3\]"):
        DCSolverScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        DCSolverScheduler(solver_type="bh3")
    with pytest.raises(ValueError, match="dc_variable must be one of"):
        DCSolverScheduler(dc_variable="sigma")
