"""The bundled-model pipeline: any scheduler, guidance, per-sample generators, output types, save/load."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from PIL import Image

from pipelines import DigitsPipeline, load_digits
from pipelines.digits_data import HELD_OUT


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=11,
    ).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    ).eval()


def make_pipe(backbone: str = "unet", scheduler=None) -> DigitsPipeline:
    model = tiny_unet() if backbone == "unet" else tiny_dit()
    key = "unet" if backbone == "unet" else "transformer"
    pipe = DigitsPipeline(scheduler=scheduler or DDPMScheduler(num_train_timesteps=1000), **{key: model})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_load_digits_split():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape == (1797 - HELD_OUT, 1, 16, 16) and xte.shape == (HELD_OUT, 1, 16, 16)
    assert xtr.min() >= -1 and xtr.max() <= 1 and set(ytr.tolist()) == set(range(10))
    # deterministic, and the two splits together are the whole data set
    assert torch.equal(load_digits("test")[0], xte)
    xall, yall = load_digits("all")
    assert sorted(torch.cat([ytr, yte]).tolist()) == sorted(yall.tolist())
    assert torch.allclose(torch.cat([xtr, xte]).sum(0), xall.sum(0), atol=1e-3)
    with pytest.raises(ValueError, match="split must be"):
        load_digits("validation")


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler,
                                           DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_any_scheduler_runs(backbone, scheduler_cls):
    pipe = make_pipe(backbone)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = pipe([0, 3, 9], guidance_scale=2.0, num_inference_steps=4, generator=gens([0, 1, 2]), output_type="pt")
    assert out.images.shape == (3, 1, 16, 16)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


class CountingEuler(EulerDiscreteScheduler):
    scaled = 0

    def scale_model_input(self, sample, timestep):
        CountingEuler.scaled += 1
        return super().scale_model_input(sample, timestep)


def test_init_noise_sigma_and_scale_model_input_are_honoured():
    pipe = make_pipe()
    pipe.scheduler = CountingEuler.from_config(pipe.scheduler.config)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].std().item()))
    pipe([1], guidance_scale=1.0, num_inference_steps=3, generator=gens([0]), output_type="pt")
    assert CountingEuler.scaled == 3
    # Euler starts from noise of std init_noise_sigma (about 157 here); scale_model_input brings it back to about 1
    assert pipe.scheduler.init_noise_sigma > 100 and 0.5 < seen[0] < 2.0


def test_guidance_one_runs_only_the_conditional_branch():
    pipe = make_pipe()
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    pipe([1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="pt")
    assert batches == [2, 2]
    batches.clear()
    pipe([1, 2], guidance_scale=3.0, num_inference_steps=2, output_type="pt")
    assert batches == [4, 4]


def test_guidance_combines_the_branches_exactly():
    """One DDIM step from the same noise: the guided output equals uncond + g (cond - uncond)."""
    pipe = make_pipe(scheduler=DDIMScheduler(num_train_timesteps=1000))
    noise = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for g, lab in ((1.0, 4), (1.0, 10), (2.5, 4)):
        outs[(g, lab)] = pipe([lab], guidance_scale=g, num_inference_steps=1, latents=noise, output_type="pt").images
    # a single DDIM step to x0 is affine in epsilon, so the guided image is the same mix of the two branches
    cond, uncond, guided = outs[(1.0, 4)], outs[(1.0, 10)], outs[(2.5, 4)]
    mix = uncond + 2.5 * (cond - uncond)
    inside = (mix > 0) & (mix < 1)  # away from the final clamp to [0, 1]
    torch.testing.assert_close(guided[inside], mix[inside], atol=1e-5, rtol=1e-5)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    pipe = make_pipe(scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
    both = pipe([3, 5], num_inference_steps=3, generator=gens([10, 11]), output_type="pt").images
    alone = pipe([5], num_inference_steps=3, generator=gens([11]), output_type="pt").images
    # batched and single-sample kernels may sum in a different order: equal up to float32 rounding
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(both[0], both[1])


def test_output_types():
    pipe = make_pipe()
    pt, arr, pil = (pipe([1, 2], output_type=o, num_inference_steps=2, generator=gens([0, 1])).images
                    for o in ("pt", "np", "pil"))
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "L" for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0, ..., 0] * 255).round().astype(np.uint8))
    assert isinstance(pipe([1], num_inference_steps=1, return_dict=False), tuple)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_save_and_load_round_trip(tmp_path, backbone):
    pipe = make_pipe(backbone, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(tmp_path)
    again = DigitsPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler) is DDIMScheduler
    a = pipe([7], num_inference_steps=3, generator=gens([4]), output_type="pt").images
    b = again([7], num_inference_steps=3, generator=gens([4]), output_type="pt").images
    assert torch.equal(a, b)


def test_bad_input_is_rejected():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="0..9"):
        pipe([11], num_inference_steps=1)
    with pytest.raises(ValueError, match="one per image"):
        pipe([1, 2], num_inference_steps=1, generator=gens([0]))
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe([1], num_inference_steps=1, latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="exactly one backbone"):
        DigitsPipeline(scheduler=DDPMScheduler())
