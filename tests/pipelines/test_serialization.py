"""pipelines.save_quantized / load_quantized on the bundled digits pipelines: bit-exact samples, no float backbone."""

import json
from pathlib import Path

import pytest
import torch

import dmq
import pipelines
from pipelines.serialization import CHECKPOINT


def _quantized_pipe(asset: str, preset: str) -> pipelines.DigitsPipeline:
    pipe = pipelines.DigitsPipeline.from_pretrained(asset)
    pipe.set_progress_bar_config(disable=True)
    dmq.quantize(pipe.backbone, preset)
    dmq.calibrate(pipe.backbone, lambda m: pipe([1, 7], num_inference_steps=3,
                                                generator=torch.Generator().manual_seed(0)))
    dmq.freeze(pipe.backbone)
    return pipe


def _sample(pipe):
    return pipe([3, 4], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images


@pytest.mark.parametrize("asset,preset", [("assets/digits-dit", "w8a8"), ("assets/digits-unet", "w4a16")])
def test_pipeline_round_trip_is_bit_exact(asset, preset, tmp_path, one_thread):
    pipe = _quantized_pipe(asset, preset)
    ref = _sample(pipe)
    out = pipelines.save_quantized(pipe, tmp_path / "q")
    name = pipelines.serialization.backbone_name(pipe)
    assert (out / name / CHECKPOINT).exists() and not list((out / name).glob("diffusion_pytorch_model*"))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DigitsPipeline"
    loaded = pipelines.load_quantized(out)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is pipelines.DigitsPipeline and loaded.backbone._dmq.packed
    assert torch.equal(_sample(loaded), ref)
    # the checkpoint is smaller than the float backbone it replaces
    fp = sum(p.stat().st_size for p in Path(asset, name).glob("*.safetensors"))
    assert (out / name / CHECKPOINT).stat().st_size < fp


def test_not_a_quantized_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a folder written by pipelines.save_quantized"):
        pipelines.load_quantized(tmp_path)
