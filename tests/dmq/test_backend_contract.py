"""The diffusers quantization-backend contract (diffusers' ``QuantizationTesterMixin``) for ``quant_method="dmq"``.

For every family (Flux, SD3, Wan, Qwen-Image, PixArt, the SD U-Net, the bundled digits U-Net and DiT) and a
weight-only (w4a16), a W8A8 (calibrated: quantized with dmq, saved, loaded by plain ``from_pretrained``) and an FP4
(nvfp4, dynamic activations: quantized on load) preset: parameter count, memory footprint >= 1.2x smaller, inference
without NaN, dtype casts raising, quantized-layer count, config serialization, original dtype, sharded
serialization round trip (bit-exact), ``device_map="cpu"``, dequantize, LoRA inference and LoRA training.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dmq
from dmq.packed_weight import PackedWeight
from tests.dmq.backend_models import FAMILIES, build, run

PRESETS = ("w4a16", "w8a8", "nvfp4")


def _cfg(preset: str) -> dmq.QuantConfig:
    # the contract quantizes every Linear (keep_fp only what the model or the user names), as other backends do
    return dmq.get_config(preset).replace(keep_fp=())


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            model, inputs = build(family)
            d = tmp_path_factory.mktemp(family.replace("-", "_"))
            model.save_pretrained(d)
            cache[family] = (d, type(model), inputs)
        return cache[family]

    return get


def _quantized(float_dirs, family, preset, tmp_path, **kwargs):
    """The contract's ``_create_quantized_model``: quantize on load where the preset allows it; a calibrated preset
    goes through dmq's verbs, save_pretrained and a plain from_pretrained (its only route into diffusers)."""
    d, cls, inputs = float_dirs(family)
    if preset != "w8a8":
        return cls.from_pretrained(d, quantization_config=dmq.DmqConfig(_cfg(preset)), **kwargs), inputs
    model = cls.from_pretrained(d)
    dmq.calibrate(dmq.quantize(model, _cfg(preset)), lambda m: run(m, inputs))
    dmq.freeze(model)
    model.save_pretrained(tmp_path / "calibrated")
    return cls.from_pretrained(tmp_path / "calibrated", **kwargs), inputs


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backend_contract(family, preset, float_dirs, tmp_path, one_thread):
    d, cls, inputs = float_dirs(family)
    fp = cls.from_pretrained(d)
    model, inputs = _quantized(float_dirs, family, preset, tmp_path)

    # parameter count and memory footprint
    assert model.num_parameters() == fp.num_parameters()
    assert fp.get_memory_footprint() / model.get_memory_footprint() >= 1.2
    # every Linear is quantized (a packed .weight with the float weight's shape), none left out
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    lin, fp_lin = _linears(model), _linears(fp)
    assert lin.keys() == fp_lin.keys()
    for name, m in lin.items():
        kept = any(k in name for k in keep)
        assert isinstance(m.weight, PackedWeight) != kept, name
        assert m.weight.shape == fp_lin[name].weight.shape
    # inference
    out = run(model, inputs)
    assert out.shape == run(fp, inputs).shape and torch.isfinite(out).all()
    # dtype assignment raises; moves work
    for cast in (lambda m: m.to(torch.float16), lambda m: m.to(device="cpu", dtype=torch.float16),
                 lambda m: m.float(), lambda m: m.half()):
        with pytest.raises(ValueError):
            cast(model)
    model.to("cpu")
    assert torch.equal(run(model, inputs), out)
    # config serialization and the original dtype
    qc = model.config["quantization_config"]
    assert json.loads(qc.to_json_string())["quant_method"] == "dmq"
    assert qc.to_dict()["quant_method"] == "dmq" and isinstance(qc.to_diff_dict(), dict)
    assert model.config["_pre_quantization_dtype"] == torch.float32
    # sharded serialization: several shards and an index; plain from_pretrained loads it back bit for bit
    model.save_pretrained(tmp_path / "saved", max_shard_size=max(int(model.get_memory_footprint() // 2), 1))
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    assert (tmp_path / "saved" / "diffusion_pytorch_model.safetensors.index.json").exists()
    saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved_cfg["quant_method"] == "dmq" and saved_cfg["pre_quantization_dtype"] == "float32"
    loaded = cls.from_pretrained(tmp_path / "saved", device_map="cpu")
    assert loaded.hf_device_map is not None and loaded.device == torch.device("cpu")
    assert torch.equal(run(loaded, inputs), out)
    # dequantize: plain float layers; weight-only layers compute exactly what the packed ones' reference did (the
    # packed weight dequantized into the GEMM; the int4pack kernel, if any, is within float rounding of it)
    with dmq.kernels.disable("all"):
        reference = run(model, inputs)
    if preset == "w4a16":
        assert (reference - out).abs().max() <= 1e-5 * out.abs().max()
    model.dequantize()
    assert all(type(m) is nn.Linear for m in _linears(model).values())
    assert "quantization_config" not in model.config and not model.is_quantized
    deq = run(model, inputs)
    assert torch.isfinite(deq).all()
    if preset == "w4a16":
        assert torch.equal(deq, reference)


LORA_FAMILIES = ["flux", "sd3", "wan", "qwen-image", "sd-unet"]  # the classes with diffusers' PeftAdapterMixin


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_lora_inference_and_training(family, float_dirs, tmp_path, one_thread):
    from peft import LoraConfig

    model, inputs = _quantized(float_dirs, family, "w4a16", tmp_path)
    base = run(model, inputs)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                 init_lora_weights=False))
    with_lora = run(model, inputs)
    assert torch.isfinite(with_lora).all() and not torch.equal(with_lora, base)
    # training: gradients reach the adapters through the frozen quantized layers
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    out = model(**inputs, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.norm() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_modules_to_not_convert_and_keep_in_fp32(float_dirs, tmp_path, one_thread):
    d, cls, inputs = float_dirs("wan")
    full = cls.from_pretrained(d, quantization_config=dmq.DmqConfig(_cfg("w4a16")), torch_dtype=torch.bfloat16)
    part = cls.from_pretrained(d, quantization_config=dmq.DmqConfig(_cfg("w4a16"), modules_to_not_convert=["ffn"]),
                               torch_dtype=torch.bfloat16)
    for name, m in _linears(part).items():
        fp32 = any(k in name for k in cls._keep_in_fp32_modules)
        assert isinstance(m.weight, PackedWeight) == (not fp32 and "ffn" not in name), name
        assert m.weight.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert part.get_memory_footprint() > full.get_memory_footprint()
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    assert torch.isfinite(run(part, bf16)).all()


def test_device_map_auto(float_dirs, one_thread):
    d, cls, inputs = float_dirs("sd3")
    model = cls.from_pretrained(d, quantization_config=dmq.DmqConfig(_cfg("nvfp4")), device_map="auto")
    assert model.hf_device_map
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu"
    assert torch.isfinite(run(model, inputs)).all()


def test_bad_inputs(float_dirs, tmp_path):
    with pytest.raises(ValueError, match="w4a16"):
        dmq.DmqConfig("w5a5")  # names the presets
    with pytest.raises(TypeError, match="modules_to_not_convert"):
        dmq.DmqConfig("w4a16", modules_to_not_convert="ffn")
    d, cls, _ = float_dirs("pixart")
    with pytest.raises(ValueError, match="needs calibration data"):  # static activations cannot quantize on load
        cls.from_pretrained(d, quantization_config=dmq.DmqConfig("w8a8"))


def test_without_import_dmq_diffusers_refuses_the_checkpoint(float_dirs, tmp_path):
    from diffusers.quantizers import auto

    from dmq.backend import register

    d, cls, inputs = float_dirs("pixart")
    cls.from_pretrained(d, quantization_config=dmq.DmqConfig("w4a16")).save_pretrained(tmp_path / "q")
    auto.AUTO_QUANTIZER_MAPPING.pop("dmq")
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("dmq")
    try:
        with pytest.raises(ValueError, match="Unknown quantization type, got dmq"):
            cls.from_pretrained(tmp_path / "q")
    finally:
        register()
    assert torch.isfinite(run(cls.from_pretrained(tmp_path / "q"), inputs)).all()


def test_a_damaged_shard_names_the_tensor(float_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d, cls, _ = float_dirs("pixart")
    cls.from_pretrained(d, quantization_config=dmq.DmqConfig("w4a16")).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("attn1.to_q.qweight"))
    tensors[key] = tensors[key] ^ 1  # flip one bit of every code byte
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="attn1.to_q.qweight"):
        cls.from_pretrained(tmp_path / "q")


def test_dmq_save_and_load_are_save_pretrained_and_from_pretrained(float_dirs, tmp_path, one_thread):
    d, cls, inputs = float_dirs("digits-dit")
    model = cls.from_pretrained(d)
    dmq.calibrate(dmq.quantize(model, "w8a8"), lambda m: run(m, inputs))
    dmq.freeze(model)
    ref = run(model, inputs)
    dmq.save(model, tmp_path / "m", max_shard_size=200_000)
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    for loaded in (dmq.load(tmp_path / "m"), cls.from_pretrained(tmp_path / "m"), dmq.load(cls.from_pretrained(d),
                                                                                              tmp_path / "m")):
        assert isinstance(loaded.transformer_blocks[0].attn1.to_q.weight, PackedWeight)
        assert torch.equal(run(loaded, inputs), ref)
