"""A dmq-quantized pipeline end to end through diffusers: saved and reloaded with plain ``from_pretrained``, two
LoRAs in diffusers' format loaded with ``load_lora_weights`` and mixed with ``set_adapters``, then compiled."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import dmq
from dmq.modules import QuantLinear
from tests.pipelines.tiny_pipelines import build, generate

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _write_lora(pipe, seed, path):
    """A random LoRA for the pipeline's transformer, written in diffusers' format by ``save_lora_weights``."""
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                                 adapter_name="tmp")
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="tmp")
    type(pipe).save_lora_weights(path, transformer_lora_layers=layers)
    pipe.transformer.delete_adapters("tmp")


def test_quantized_pipeline_with_two_loras_saved_reloaded_compiled(tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    rep = build("sd3")
    rep.pipe.set_progress_bar_config(disable=True)
    dmq.freeze(dmq.quantize(rep.pipe.transformer, "w4a16"))
    base = generate(rep, 2)
    rep.pipe.save_pretrained(tmp_path / "pipe")
    # the tiny replica runs on prompt_embeds: no text encoders, no tokenizers
    absent = dict.fromkeys(("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                            "tokenizer_3"))
    rep.pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", **absent)  # plain diffusers after import dmq
    rep.pipe.set_progress_bar_config(disable=True)
    assert rep.pipe.transformer.config["quantization_config"].to_dict()["config"] == "w4a16"
    assert torch.equal(generate(rep, 2), base)
    rep.pipe.fuse_lora(components=["transformer"])  # no LoRA: nothing to fuse, nothing changes
    assert torch.equal(generate(rep, 2), base)
    assert not [n for n, _ in rep.pipe.transformer.named_buffers() if "lora_fused" in n]

    for name, seed in (("a", 1), ("b", 2)):
        _write_lora(rep.pipe, seed, tmp_path / name)
        rep.pipe.load_lora_weights(tmp_path / name, adapter_name=name)
    rep.pipe.set_adapters(["a", "b"], [1.0, 0.5])
    both = generate(rep, 2)
    rep.pipe.set_adapters(["a"], [1.0])
    only_a = generate(rep, 2)
    assert torch.isfinite(both).all() and not torch.equal(both, base) and not torch.equal(both, only_a)
    rep.pipe.set_adapters(["a", "b"], [0.0, 0.0])  # zero-weighted adapters add exactly nothing
    assert torch.equal(generate(rep, 2), base)

    # fuse_lora folds the weighted adapters into each quantized layer's 16-bit side branch (the packed codes stay);
    # unfuse_lora gives back the unfused pipeline bit for bit
    rep.pipe.set_adapters(["a", "b"], [1.0, 0.5])
    packed = {n: {k: t.clone() for k, t in m.weight.tensors().items()}
              for n, m in rep.pipe.transformer.named_modules()
              if isinstance(getattr(m, "base_layer", None), QuantLinear)}
    rep.pipe.fuse_lora(components=["transformer"], adapter_names=["a", "b"])  # weights 1.0 and 0.5, as set
    fused = generate(rep, 2)
    assert (fused - both).abs().max() <= 1e-5 * both.abs().max() and not torch.equal(fused, base)
    fused_layers = [m.base_layer for n, m in rep.pipe.transformer.named_modules() if n in packed]
    assert fused_layers and all(m.lora_fused.shape == m.weight.shape for m in fused_layers)
    rep.pipe.unfuse_lora(components=["transformer"])
    assert torch.equal(generate(rep, 2), both)
    for n, m in rep.pipe.transformer.named_modules():
        if n in packed:
            assert all(torch.equal(t, packed[n][k]) for k, t in m.base_layer.weight.tensors().items())
            assert "lora_fused" not in m.base_layer._buffers
    rep.pipe.set_adapters(["a", "b"], [1.0, 0.5])

    # a LoRA naming modules the model does not have is a clear error
    with pytest.raises(ValueError, match="not found"):
        rep.pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["no_such_layer"]), adapter_name="bad")

    # compiled code traces the reference computation (the packed weight dequantized into the GEMM): bit for bit
    # the eager model with the low-bit kernels off, and within float rounding of the eager int4pack kernel
    with dmq.kernels.disable("all"):
        reference = generate(rep, 2)
    assert (reference - both).abs().max() <= 1e-5 * both.abs().max()
    torch._dynamo.reset()
    rep.pipe.transformer = torch.compile(rep.pipe.transformer, fullgraph=True, backend="aot_eager")
    assert torch.equal(generate(rep, 2), reference)
