"""use_sampler keeps the pipeline's noise schedule and prediction type, and rejects what it does not know."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

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
    with pytest.raises(ValueError, match="available: \\['dc-solver', 'deis'\\]"):
        use_sampler(pipe, "euler-a")
    with pytest.raises(ValueError, match="valid options"):
        use_sampler(pipe, "dc-solver", deis_order=2)
    with pytest.raises(ValueError, match="valid options"):
        use_sampler(pipe, "deis", solver_order=3)
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
