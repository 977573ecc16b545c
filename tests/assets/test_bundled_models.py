"""The bundled models reload from assets/ to the function they were saved with, and generate the asked digits."""

from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors.torch import load_file

from pipelines import DigitClassifier, DigitsPipeline, load_digits

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PIPELINES = [("digits-unet", "unet"), ("digits-dit", "transformer")]


@pytest.mark.parametrize("name,attr", PIPELINES)
def test_pipeline_reloads_to_the_saved_outputs(name, attr):
    pipe = DigitsPipeline.from_pretrained(ASSETS / name)
    model = getattr(pipe, attr)
    assert model is not None and getattr(pipe, "transformer" if attr == "unet" else "unet") is None
    ref = load_file(ASSETS / name / "reference.safetensors")
    with torch.no_grad():
        out = model(ref["sample"], ref["timestep"], class_labels=ref["class_labels"]).sample
    # bit-identical on the machine that saved them; other CPUs may order float sums differently
    torch.testing.assert_close(out, ref["output"], rtol=1e-5, atol=1e-5)
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.prediction_type == "epsilon"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < 8 * 2**20  # a few MB, as the asset budget asks


def test_classifier_reloads_and_reads_held_out_digits():
    clf = DigitClassifier.from_pretrained(ASSETS / "digits-classifier").eval()
    ref = load_file(ASSETS / "digits-classifier" / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(clf(ref["images"]), ref["logits"], rtol=1e-5, atol=1e-5)
        x, y = load_digits("test")
        assert (clf(x).argmax(-1) == y).float().mean() >= 0.97


@pytest.mark.parametrize("name,attr", PIPELINES)
def test_bundled_models_generate_the_asked_digit(name, attr):
    pipe = DigitsPipeline.from_pretrained(ASSETS / name)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    clf = DigitClassifier.from_pretrained(ASSETS / "digits-classifier").eval()
    labels = torch.arange(60) % 10
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(60)]
    images = pipe(labels, guidance_scale=2.0, num_inference_steps=20, generator=gens, output_type="pt").images
    with torch.no_grad():
        acc = (clf(images * 2 - 1).argmax(-1) == labels).float().mean().item()
    assert acc >= 0.9, f"{name}: class accuracy {acc:.2f} at guidance 2"
