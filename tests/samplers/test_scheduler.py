"""DEISScheduler keeps the diffusers scheduler contract, with exact-denoiser checks on Gaussian data."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from samplers import DEISScheduler

F64 = torch.float64
SHAPE = (2, 2, 2)

# Scheduler configs as published with the pipelines (scheduler/scheduler_config.json), without hub access.
CONFIGS = {
    "ddpm": (DDPMScheduler, {"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                             "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}),
    "ddim": (DDIMScheduler, {"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                             "num_train_timesteps": 1000, "set_alpha_to_one": True, "steps_offset": 0,
                             "trained_betas": None}),
    "sd15": (PNDMScheduler, {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                             "steps_offset": 1, "trained_betas": None, "clip_sample": False}),
    "sdxl": (EulerDiscreteScheduler, {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                      "clip_sample": False, "interpolation_type": "linear",
                                      "num_train_timesteps": 1000, "prediction_type": "epsilon",
                                      "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
                                      "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
                                      "use_karras_sigmas": False}),
    "pixart": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "beta_end": 0.02,
                                             "beta_schedule": "linear", "beta_start": 0.0001,
                                             "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
                                             "lower_order_final": True, "num_train_timesteps": 1000,
                                             "prediction_type": "epsilon", "sample_max_value": 1.0,
                                             "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
                                             "thresholding": False, "timestep_spacing": "linspace",
                                             "trained_betas": None, "use_karras_sigmas": False,
                                             "variance_type": None}),
    "dit": (DDIMScheduler, {"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False,
                            "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
                            "steps_offset": 0, "trained_betas": None}),
    "sd21v": (DDIMScheduler, {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                              "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                              "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}),
    "sd3": (FlowMatchEulerDiscreteScheduler, {"num_train_timesteps": 1000, "shift": 3.0}),
    "flux": (FlowMatchEulerDiscreteScheduler, {"base_image_seq_len": 256, "base_shift": 0.5,
                                               "max_image_seq_len": 4096, "max_shift": 1.15,
                                               "num_train_timesteps": 1000, "shift": 3.0,
                                               "use_dynamic_shifting": True}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gauss() -> GaussianMixture:
    return GaussianMixture.random(1, 1, SHAPE, seed=3, min_eigval=0.05, max_eigval=0.5)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sample(sched, model, x, **set_kw):
    sched.set_timesteps(**set_kw)
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    return x


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def mu_for(config, seq_len=1024):
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]


# ---------------------------------------------------------------------------------------------------------------------
# from_config on real pipeline configs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_config_of_pipeline_schedulers(name, gauss):
    cls, cfg = CONFIGS[name]
    source = cls.from_config(cfg)
    sched = DEISScheduler.from_config(source.config)
    flow = cls is FlowMatchEulerDiscreteScheduler
    assert sched.config.prediction_type == ("flow_prediction" if flow else source.config.prediction_type)
    assert sched.init_noise_sigma == 1.0 and len(sched) == 1000
    if not flow:
        assert torch.equal(sched.alphas_cumprod, source.alphas_cumprod)
    model = GMMDenoiser.from_scheduler_config(gauss, source.config)
    set_kw = {"num_inference_steps": 20}
    if name == "flux":
        set_kw["mu"] = mu_for(cfg)
    x_t = randn(8, *SHAPE, seed=1)
    sched.set_timesteps(**set_kw)
    t0 = float(sched.timesteps[0])
    assert t0 == (1000.0 if flow else 999.0)
    x = sample(sched, model, x_t, **set_kw)
    ref = reference_sample(model, x_t, t_start=t0)
    assert torch.isfinite(x).all()
    assert (x - ref).pow(2).mean().sqrt() < 5e-3


def test_flux_custom_sigmas_and_mu_match_flowmatch():
    cfg = CONFIGS["flux"][1]
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ours = DEISScheduler.from_config(ref.config)
    sigmas = np.linspace(1.0, 1 / 28, 28)
    ref.set_timesteps(sigmas=sigmas, mu=mu_for(cfg))
    ours.set_timesteps(sigmas=sigmas, mu=mu_for(cfg))
    np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert ours.timesteps.dtype == torch.float32  # flow timesteps are never integers
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(10)


# ---------------------------------------------------------------------------------------------------------------------
# exactness anchors


@pytest.mark.parametrize("spacing, n", [("trailing", 10), ("leading", 20)])
def test_order0_equals_ddim(spacing, n, gauss):
    ddim = DDIMScheduler(set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing)
    ddim.set_timesteps(n)
    ours = DEISScheduler(deis_order=0)
    ours.set_timesteps(timesteps=ddim.timesteps)
    assert torch.equal(ours.timesteps, ddim.timesteps)
    model = GMMDenoiser(gauss)
    ac = ddim.alphas_cumprod.double()
    x_d = x_o = x_e = randn(8, *SHAPE, seed=2)
    ts = ddim.timesteps.tolist()
    for i, t in enumerate(ts):
        x_d = ddim.step(model(x_d, t).sample, t, x_d).prev_sample
        x_o = ours.step(model(x_o, t).sample, t, x_o).prev_sample
        # the DDIM formula in float64: x' = sqrt(ᾱ') x̂0 + sqrt(1 - ᾱ') ε
        eps = model(x_e, t).sample
        a, a_next = ac[t], (ac[ts[i + 1]] if i + 1 < n else torch.tensor(1.0, dtype=F64))
        x_e = a_next.sqrt() * (x_e - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_next).sqrt() * eps
        assert (x_o - x_d).abs().max() < 1e-6  # diffusers' DDIM rounds its coefficients to float32
        assert (x_o - x_e).abs().max() < 1e-12


def test_final_step_lands_at_sigma_zero(gauss):
    # DDIM (order 0) at any NFE: the last output is exactly the model's x̂0 (sample prediction)
    model = GMMDenoiser(gauss, prediction_type="sample")
    x_t = randn(4, *SHAPE, seed=3)
    for n in (1, 3, 10):
        sched = DEISScheduler(prediction_type="sample", deis_order=0)
        sched.set_timesteps(n)
        x = x_t
        for t in sched.timesteps:
            x0 = model(x, t).sample
            out = sched.step(x0, t, x)
            x = out.prev_sample
        assert torch.equal(out.prev_sample, x0) and torch.equal(out.pred_original_sample, x0)
        assert float(sched.sigmas[-1]) == 0.0
    # every method and order integrates a constant ε exactly to σ = 0: y(0) = y_T - ρ_T ε, i.e. x̂0 of the start
    for method, order in (("tab", 3), ("tab", 1), ("rhoab", 3), ("ipndm", 3), ("rhork", 4), ("rhork", 2)):
        for n in (1, 5, 20):
            sched = DEISScheduler(deis_method=method, deis_order=order)
            sched.set_timesteps(n)
            eps = randn(4, *SHAPE, seed=4)
            x = x_t
            for t in sched.timesteps:
                x = sched.step(eps, t, x).prev_sample
            rho_T = float(sched._plan.rhos[0])
            assert torch.allclose(x, x_t * math.sqrt(1 + rho_T**2) - rho_T * eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_prediction_types_give_the_same_trajectory(schedule, gauss):
    preds = ["epsilon", "v_prediction", "sample"] if schedule == "vp" else ["flow_prediction"]
    x_t = randn(4, *SHAPE, seed=5)
    outs = []
    for pred in preds:
        sched = DEISScheduler(prediction_type=pred)
        outs.append(sample(sched, GMMDenoiser(gauss, schedule, pred), x_t, num_inference_steps=12))
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=0, atol=1e-10)
    if schedule == "flow":
        ref = reference_sample(GMMDenoiser(gauss, "flow"), x_t)
        assert (outs[0] - ref).pow(2).mean().sqrt() < 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# state, serialisation, img2img, precision


def test_set_timesteps_resets_all_state(gauss):
    model, x_t = GMMDenoiser(gauss), randn(4, *SHAPE, seed=6)
    sched = DEISScheduler()
    first = sample(sched, model, x_t, num_inference_steps=10)
    sched.set_timesteps(10)
    x = x_t
    for t in sched.timesteps[:4]:  # abandon a run halfway
        x = sched.step(model(x, t).sample, t, x).prev_sample
    assert sched.step_index == 4 and sched._history
    sched.set_timesteps(10)
    assert sched.step_index is None and sched.begin_index is None and not sched._history
    assert torch.equal(sample(sched, model, x_t, num_inference_steps=10), first)


def test_save_load_round_trip(tmp_path, gauss):
    sched = DEISScheduler.from_config(
        CONFIGS["sd15"][1], deis_method="rhoab", deis_order=2, time_grid="rho", time_grid_power=5.0
    )
    sched.save_pretrained(tmp_path)
    loaded = DEISScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(sched.config)
    model, x_t = GMMDenoiser(gauss, alphas_cumprod=sched.alphas_cumprod), randn(4, *SHAPE, seed=7)
    a, b = (sample(s, model, x_t, num_inference_steps=9) for s in (loaded, sched))
    assert torch.equal(a, b)
    flow = DEISScheduler.from_config(CONFIGS["flux"][1])
    flow.save_pretrained(tmp_path / "flow")
    assert public(DEISScheduler.from_pretrained(tmp_path / "flow").config) == public(flow.config)


def test_add_noise_and_scale_noise():
    x0, noise = randn(3, *SHAPE, seed=8, dtype=torch.float32), randn(3, *SHAPE, seed=9, dtype=torch.float32)
    ddpm, ours = DDPMScheduler(), DEISScheduler()
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=1e-6)
    # fractional VP timesteps use the model's log-linear ρ(t)
    model = GMMDenoiser(GaussianMixture.random(1, 1, SHAPE, seed=0))
    a, s = model.alpha_sigma(torch.tensor([250.5]))
    got = ours.add_noise(x0[:1].double(), noise[:1].double(), torch.tensor([250.5]))
    assert torch.allclose(got, a * x0[:1].double() + s * noise[:1].double(), rtol=1e-12)
    flow = DEISScheduler.from_config(CONFIGS["sd3"][1])
    flow.set_timesteps(10)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    ref.set_begin_index(3)
    t3 = ref.timesteps[3:4]
    sigma = t3 / 1000
    assert torch.allclose(flow.scale_noise(x0, t3, noise), ref.scale_noise(x0, t3, noise), atol=1e-6)
    assert torch.allclose(flow.scale_noise(x0, t3, noise), sigma * noise + (1 - sigma) * x0, atol=1e-6)


@pytest.mark.parametrize("method", ["tab", "ipndm", "rhork"])
def test_begin_index_matches_a_run_from_the_cut(method, gauss):
    model, x_t = GMMDenoiser(gauss), randn(4, *SHAPE, seed=10)
    full = DEISScheduler(deis_method=method, deis_order=2)
    full.set_timesteps(12)
    start = 4 * full.order
    tail = full.timesteps[start:]
    full.set_begin_index(start)  # what img2img pipelines do after slicing the timesteps
    x = x_t
    for t in tail:
        x = full.step(model(x, t).sample, t, x).prev_sample
    cut = DEISScheduler(deis_method=method, deis_order=2)
    step_ts = full._nodes[4:]
    got = sample(cut, model, x_t, timesteps=step_ts)
    assert torch.equal(x, got)
    if method == "rhork":
        with pytest.raises(ValueError, match="intermediate Runge-Kutta stage"):
            full.set_begin_index(start + 1)


def test_fp16_model_keeps_fp32_state(gauss):
    model, x_t = GMMDenoiser(gauss), randn(4, *SHAPE, seed=11, dtype=torch.float32)
    sched = DEISScheduler()
    sched.set_timesteps(10)
    x = x_t.half()
    for t in sched.timesteps:
        out = model(x.float(), t).sample.half()
        x = sched.step(out, t, x).prev_sample
        assert x.dtype == torch.float16
        assert all(e.dtype == torch.float32 and z.dtype == torch.float32 for e, z in sched._history)
    ref = sample(DEISScheduler(), model, x_t, num_inference_steps=10)
    assert (x.float() - ref).abs().max() < 2e-2


def test_rk_timesteps_list_every_evaluation(gauss):
    model, x_t = GMMDenoiser(gauss), randn(4, *SHAPE, seed=12)
    for order, evals in ((1, 6), (2, 12), (3, 18), (4, 23)):
        sched = DEISScheduler(deis_method="rhork", deis_order=order)
        sched.set_timesteps(6)
        assert sched.order == order and len(sched.timesteps) == evals == len(sched.sigmas) - 1
        assert sched.num_inference_steps == 6 and sched.timesteps.dtype == torch.float32  # stages are fractional
        x = sample(sched, model, x_t, num_inference_steps=6)  # a plain pipeline loop
        assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------------------
# robustness and validation


METHOD_ORDERS = [(m, o) for m in ("tab", "rhoab", "ipndm") for o in range(4)] + [("rhork", o) for o in range(1, 5)]


@pytest.mark.parametrize("method, order", METHOD_ORDERS)
def test_no_nan_for_any_grid_prediction_or_nfe(method, order):
    mix = GaussianMixture.random(2, 2, (4,), seed=1)
    x_vp, x_flow = randn(2, 4, seed=13), randn(2, 4, seed=14)
    for pred in ("epsilon", "v_prediction", "sample", "flow_prediction"):
        flow = pred == "flow_prediction"
        model = GMMDenoiser(mix, "flow" if flow else "vp", pred)
        for grid in ("time", "rho", "log_rho", "spacing"):
            sched = DEISScheduler(prediction_type=pred, deis_method=method, deis_order=order, time_grid=grid)
            for n in (1, 2, 3, 4, 7, 16, 50):
                x = sample(sched, model, x_flow if flow else x_vp, num_inference_steps=n)
                assert torch.isfinite(x).all(), (pred, grid, n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"deis_method": "unipc"}, r"deis_method must be one of \('tab', 'rhoab', 'rhork', 'ipndm'\)"),
        ({"deis_order": 4}, r"deis_order for deis_method='tab' must be one of \[0, 1, 2, 3\]"),
        ({"deis_method": "rhork", "deis_order": 0}, r"must be one of \[1, 2, 3, 4\]"),
        ({"time_grid": "karras"}, r"time_grid must be one of \('time', 'rho', 'log_rho', 'beta', 'spacing'\)"),
        ({"time_grid_power": -1.0}, "time_grid_power must be"),
        ({"prediction_type": "x0"}, r"prediction_type must be one of \('epsilon', 'v_prediction', 'sample'"),
        ({"timestep_spacing": "even"}, r"timestep_spacing must be one of \('linspace', 'leading', 'trailing'\)"),
        ({"beta_schedule": "cosine"}, r"beta_schedule must be one of \('linear', 'scaled_linear'"),
        ({"time_shift_type": "log"}, r"time_shift_type must be one of \('exponential', 'linear'\)"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEISScheduler(**kwargs)


def test_invalid_set_timesteps_raise():
    sched = DEISScheduler()
    with pytest.raises(ValueError, match="at most one of `timesteps` and `sigmas`"):
        sched.set_timesteps(timesteps=[999, 500], sigmas=[10.0, 1.0])
    with pytest.raises(ValueError, match="pass num_inference_steps, timesteps or sigmas"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="integer >= 1"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(timesteps=[500, 700])
    with pytest.raises(ValueError, match=r"timesteps must be finite values in \[0, 999\]"):
        sched.set_timesteps(timesteps=[1200, 500])
    with pytest.raises(ValueError, match="sigmas"):
        sched.set_timesteps(sigmas=[1e4, 1.0])
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        sched.set_timesteps(3, timesteps=[999, 500])
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        DEISScheduler().step(torch.zeros(1), 999, torch.zeros(1))
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="eta must be 0"):
        sched.step(torch.zeros(1), sched.timesteps[0], torch.zeros(1), eta=0.5)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        sched.step(torch.zeros(1), 123.5, torch.zeros(1))


@pytest.mark.parametrize("method", ["tab", "rhork"])
def test_drop_in_for_a_diffusers_pipeline(method):
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(CONFIGS["ddpm"][1]))
    pipe.scheduler = DEISScheduler.from_config(pipe.scheduler.config, deis_method=method)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(image.images).all() and image.images.shape == (2, 8, 8, 1)


# Stable Video Diffusion's scheduler_config.json: EDM's continuous timesteps through diffusers' Euler
SVD = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
       "num_train_timesteps": 1000, "prediction_type": "v_prediction", "sigma_max": 700.0, "sigma_min": 0.002,
       "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous", "trained_betas": None,
       "use_karras_sigmas": True}


def _gauss_v(c):
    def v_model(x, t):  # the exact v-prediction for data N(0, c²) at ρ = exp(4 t)
        rho = math.exp(4 * float(t))
        a, s = 1 / math.sqrt(1 + rho * rho), rho / math.sqrt(1 + rho * rho)
        x0 = a * c * c * x / (a * a * c * c + s * s)
        return a * (x - a * x0) / s - s * x0
    return v_model


@pytest.mark.parametrize("cls", ["deis", "dc-solver"])
def test_edm_continuous_timesteps_reach_the_exact_sample(cls):
    """DEIS and DC-Solver run SVD's EDM schedule in VP form: the model receives c_noise = ln(σ)/4 on Euler's own
    Karras grid, and on Gaussian data N(0, c²) they converge at high order to the exact probability-flow solution
    x0 = x_T sqrt(1 + σ_max²) c / sqrt(c² + σ_max²) (y = x/α, dy/dρ = ρ y / (c² + ρ²)), far ahead of Euler."""
    from samplers import DCSolverScheduler

    src = EulerDiscreteScheduler(**SVD)
    new = (DEISScheduler if cls == "deis" else DCSolverScheduler).from_config
    sch = new(src.config)
    src.set_timesteps(20)
    sch.set_timesteps(20)
    np.testing.assert_allclose(sch.timesteps.double().numpy(), src.timesteps.double().numpy(), rtol=1e-5)
    assert sch.timesteps[0] == pytest.approx(math.log(700) / 4) and sch.timesteps[-1] == pytest.approx(
        math.log(0.002) / 4)
    c, noise = 0.5, randn(4, 8)
    exact = noise * math.sqrt(1 + 700.0**2) * c / math.sqrt(c * c + 700.0**2)
    model = _gauss_v(c)

    def error(sched, n):
        sched.set_timesteps(n)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
        return float((x - exact).abs().max() / exact.abs().max())

    e40, e80 = error(new(src.config), 40), error(new(src.config), 80)
    assert e80 < e40 / 4 and e40 < error(EulerDiscreteScheduler(**SVD), 40) / 5 and e80 < 2e-3
