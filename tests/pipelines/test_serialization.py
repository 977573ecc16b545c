"""pipelines.save_quantized / load_quantized on the bundled digits pipelines: bit-exact samples, no float backbone."""

import json
from pathlib import Path

import pytest
import torch

import dmq
import pipelines


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
    # an ordinary diffusers pipeline folder; the backbone's config names the dmq backend, and the folder names its own
    # pipeline code (digits_pipeline.py), as the bundled assets do
    assert json.loads((out / name / "config.json").read_text())["quantization_config"]["quant_method"] == "dmq"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["digits_pipeline", "DigitsPipeline"]
    loaded = pipelines.load_quantized(out)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is pipelines.DigitsPipeline and loaded.backbone._dmq.packed
    assert torch.equal(_sample(loaded), ref)
    # the checkpoint is smaller than the float backbone it replaces
    fp = sum(p.stat().st_size for p in Path(asset, name).glob("*.safetensors"))
    assert sum(p.stat().st_size for p in (out / name).glob("*.safetensors")) < fp
    # and plain diffusers loads it too (after import dmq), with the same samples
    plain = pipelines.DigitsPipeline.from_pretrained(out)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(_sample(plain), ref)


def test_not_a_quantized_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        pipelines.load_quantized(tmp_path)


def test_generic_diffusers_dit_pipeline_round_trips(tmp_path, one_thread):
    import diffusers
    import numpy as np

    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=4,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    blocks = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)}
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, **blocks).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)

    def run(p):
        return p([0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    dmq.quantize(pipe.transformer, "w8a8")
    dmq.calibrate(pipe.transformer, lambda m: run(pipe))
    dmq.freeze(pipe.transformer)
    ref = run(pipe)
    loaded = pipelines.load_quantized(pipelines.save_quantized(pipe, tmp_path / "dit"))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is diffusers.DiTPipeline and loaded.transformer._dmq.packed
    assert np.array_equal(run(loaded), ref)


@pytest.mark.parametrize("family", ["sd", "pixart-alpha", "sd3"])
def test_text_to_image_backbones_round_trip(family, tmp_path, one_thread):
    # cross-attention U-Net, PixArt transformer and SD3's joint attention: dmq.load(path) rebuilds each one
    from tests.pipelines.tiny_pipelines import build, generate

    rep = build(family)
    name = pipelines.serialization.backbone_name(rep.pipe)
    backbone = dmq.quantize(getattr(rep.pipe, name), "w8a8")
    dmq.calibrate(backbone, lambda m: [rep.pipe(**kw, num_inference_steps=2) for kw in rep.calls])
    dmq.freeze(backbone)
    ref = generate(rep, steps=2)
    dmq.save(backbone, tmp_path / "b.safetensors")
    loaded = dmq.load(tmp_path / "b.safetensors")
    assert loaded._dmq.attention and loaded._dmq.attention == backbone._dmq.attention
    setattr(rep.pipe, name, loaded)
    assert torch.equal(generate(rep, steps=2), ref)
