"""A dmq-quantized pipeline end to end through diffusers: saved and reloaded with plain ``from_pretrained``, two
LoRAs in diffusers' format loaded with ``load_lora_weights`` and mixed with ``set_adapters``, then compiled."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import dmq
from dmq.packed_weight import PackedWeightWriteError
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

    # fusing into a packed weight is refused before anything changes
    rep.pipe.set_adapters(["a", "b"], [1.0, 0.5])
    with pytest.raises(PackedWeightWriteError, match="packed weight"):
        rep.pipe.fuse_lora()
    assert torch.equal(generate(rep, 2), both)

    # a LoRA naming modules the model does not have is a clear error
    with pytest.raises(ValueError, match="not found"):
        rep.pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["no_such_layer"]), adapter_name="bad")

    torch._dynamo.reset()
    rep.pipe.transformer = torch.compile(rep.pipe.transformer, fullgraph=True, backend="aot_eager")
    assert torch.equal(generate(rep, 2), both)
