"""use_sampler keeps the pipeline's noise schedule and prediction type, and rejects what it does not know."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pipelines import DigitsPipeline, use_sampler
from samplers import DCSolverScheduler, DEISScheduler
from tests.pipelines.test_digits_pipeline import tiny_unet


def make_pipe(scheduler) -> DigitsPipeline:
    pipe = DigitsPipeline(scheduler=scheduler, unet=tiny_unet())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_deis_keeps_the_schedule_and_prediction_type():
    src = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction")
    pipe = use_sampler(make_pipe(src), "deis", deis_order=2)
    s = pipe.scheduler
    assert isinstance(s, DEISScheduler) and s.config.deis_order == 2
    assert s.config.prediction_type == "v_prediction" and s.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(s.alphas_cumprod.double(), src.alphas_cumprod.double(), rtol=1e-6, atol=0)
    images = pipe([1, 2], num_inference_steps=5, output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_flow_config_becomes_flow_prediction():
    pipe = make_pipe(FlowMatchEulerDiscreteScheduler(shift=3.0))
    use_sampler(pipe, "DEIS")
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.shift == 3.0


def test_bad_names_and_options_leave_the_pipeline_unchanged():
    pipe = make_pipe(DDPMScheduler())
    before = pipe.scheduler
    names = "\\['dc-solver', 'deis', 'ddim', 'dpm\\+\\+', 'euler', 'unipc'\\]"
    with pytest.raises(ValueError, match=f"available: {names}"):
        use_sampler(pipe, "euler-a")
    with pytest.raises(ValueError, match="valid options"):
        use_sampler(pipe, "dc-solver", deis_order=2)
    with pytest.raises(ValueError, match="valid options"):
        use_sampler(pipe, "deis", solver_order=3)
    with pytest.raises(ValueError, match="unknown option.*'deis_order'.*UniPCMultistepScheduler"):
        use_sampler(pipe, "unipc", deis_order=2)
    with pytest.raises(ValueError, match="cpr file .*nope.json"):
        use_sampler(pipe, "dc-solver", cpr="nope.json")
    assert pipe.scheduler is before


def test_dc_solver_takes_ratios_and_keeps_the_schedule():
    src = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    pipe = use_sampler(make_pipe(src), "dc-solver", ratios=[1.0, 1.0, 0.9, 1.1, 1.0])
    s = pipe.scheduler
    assert isinstance(s, DCSolverScheduler) and list(s.config.dc_ratios) == [1.0, 1.0, 0.9, 1.1, 1.0]
    torch.testing.assert_close(s.alphas_cumprod.double(), src.alphas_cumprod.double(), rtol=1e-6, atol=0)
    images = pipe([4, 5], num_inference_steps=5, output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(ValueError):
        pipe([4], num_inference_steps=6, output_type="pt")  # 5 ratios cannot serve 6 steps


@pytest.mark.parametrize("name, cls", [("dpm++", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler),
                                       ("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)])
def test_diffusers_pass_through_keeps_the_schedule(name, cls):
    src = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction")
    pipe = use_sampler(make_pipe(src), name)
    s = pipe.scheduler
    assert type(s) is cls and s.config.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod.double(), src.alphas_cumprod.double(), rtol=0, atol=0)
    if name == "dpm++":
        assert s.config.algorithm_type == "dpmsolver++"


def test_pass_through_on_flow_keeps_the_shift():
    pipe = make_pipe(FlowMatchEulerDiscreteScheduler(shift=3.0))
    use_sampler(pipe, "dpm++")
    s = pipe.scheduler
    assert isinstance(s, DPMSolverMultistepScheduler) and s.config.use_flow_sigmas and s.config.flow_shift == 3.0
    assert s.config.prediction_type == "flow_prediction"
    # the shifted flow sigmas of the source: sigma' = s*sigma / (1 + (s-1)*sigma) at the first step
    s.set_timesteps(4)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(4)
    assert float(s.sigmas[0]) == pytest.approx(float(ref.sigmas[0]), abs=1e-3)
    use_sampler(pipe, "euler")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    with pytest.raises(ValueError, match="no flow-matching version"):
        use_sampler(pipe, "ddim")


def test_dc_solver_reads_a_search_dc_file():
    from pathlib import Path

    from samplers import CascadePolynomialRegression

    path = Path(__file__).resolve().parents[2] / "assets" / "digits-unet" / "dc_cpr.json"
    pipe = use_sampler(make_pipe(DDPMScheduler()), "dc-solver", cpr=str(path), guidance_scale=2.0)
    s = pipe.scheduler
    assert s.config.cpr_guidance_scale == 2.0
    s.set_timesteps(5)
    expected = CascadePolynomialRegression.load(path).predict(5, 2.0)
    assert s.dc_ratios == pytest.approx(expected, rel=0, abs=0)
    images = pipe([3], num_inference_steps=5, output_type="pt").images
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", ["deis", "dc-solver"])
def test_edm_schedulers_keep_their_meaning_or_are_refused(name):
    """SVD's Euler (continuous c_noise = ln(σ)/4, v-prediction) becomes an EDM-form DEIS / DC-Solver with the same σ
    range; EDM's sigma_data-preconditioned schedulers are refused with the reason, the pipeline unchanged."""
    from diffusers import EDMEulerScheduler

    src = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", sigma_min=0.002, sigma_max=700.0,
                                 timestep_type="continuous", use_karras_sigmas=True)
    s = use_sampler(make_pipe(src), name).scheduler
    assert s.is_edm and (s.schedule.rho_min, s.schedule.rho_max) == (0.002, 700.0)
    pipe = make_pipe(EDMEulerScheduler())
    with pytest.raises(ValueError, match="preconditions the model with EDM's sigma_data=0.5"):
        use_sampler(pipe, name)
    assert isinstance(pipe.scheduler, EDMEulerScheduler)
