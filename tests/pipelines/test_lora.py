"""pipelines.lora: a LoRA trained or built on a float backbone, loaded onto a dmq-quantized copy, fused and unfused.

The LoRA branch sees the layer's own input, so on a single quantized layer its effect ``B A x α/r`` is exactly the
effect it has on the float layer (weight-only or with quantized activations alike): that is the closed form the
transfer test checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dmq
from pipelines import DigitsPipeline, load_digits, lora
from tests.pipelines.tiny_pipelines import ROOT


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 32)
        self.to_out = nn.Sequential(nn.Linear(32, 16))

    def forward(self, x):
        return self.to_out(torch.relu(self.to_q(x)))


def _quantized(model: nn.Module, preset: str) -> nn.Module:
    q = dmq.quantize(copy.deepcopy(model), preset)
    calib = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    dmq.calibrate(q, lambda m: m(calib))
    return dmq.freeze(q)


def _random_lora(model: nn.Module, targets=("to_q",)):
    return lora.add_lora(model, rank=4, alpha=8, target_modules=targets, init_lora_weights=False, seed=7)


@pytest.mark.parametrize("preset", ["w4a16", "w4a8"])
def test_lora_effect_on_a_quantized_layer_equals_the_float_one(preset, one_thread):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(16, 32))
    q = _quantized(fp, preset)
    x = torch.randn(8, 16)
    with torch.no_grad():
        base_fp, base_q = fp(x), q(x)
        config = lora.add_lora(fp, rank=4, alpha=8, target_modules=["0"], init_lora_weights=False)
        lora.load_lora(q, lora.lora_state_dict(fp), config)
        d_fp, d_q = fp(x) - base_fp, q(x) - base_q
    assert d_fp.abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(d_q, d_fp, rtol=1e-5, atol=1e-5 * float(d_fp.abs().max()))


def test_add_lora_starts_at_zero_and_only_the_adapter_trains(one_thread):
    model = Toy()
    x = torch.randn(4, 16)
    before = model(x).detach()
    lora.add_lora(model, rank=2)  # targets: to_q and to_out.0 among the defaults
    assert torch.equal(model(x).detach(), before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora.lora_layers(model)) == 2


def test_fuse_unfuse_and_disable_on_a_quantized_model(one_thread):
    torch.manual_seed(0)
    q = _quantized(Toy(), "w8a8")
    x = torch.randn(8, 16)
    with torch.no_grad():
        base = q(x)
        _random_lora(q, ["to_q", "to_out.0"])
        unfused = q(x)
        assert not torch.allclose(unfused, base, atol=1e-3)
        assert lora.set_lora_enabled(q, False) == 2
        assert torch.equal(q(x), base)
        lora.set_lora_enabled(q, True)
        assert lora.fuse_lora(q) == 2
        fused = q(x)
        torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5 * float(unfused.abs().max()))
        assert lora.unfuse_lora(q) == 2
        assert torch.equal(q(x), unfused)
        assert lora.unfuse_lora(q) == 0  # nothing left to unmerge


def test_bad_input_names_the_argument(one_thread):
    model = Toy()
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(model, rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        lora.add_lora(model, target_modules="to_q")
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        lora.lora_state_dict(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.fuse_lora(model)
    config = _random_lora(model)
    state = lora.lora_state_dict(model)
    other = Toy()
    with pytest.raises(ValueError, match="does not match"):
        lora.load_lora(other, {k.replace("to_q", "to_out.0"): v for k, v in state.items()}, config)


@pytest.fixture(scope="module")
def dit_pipe():
    pipe = DigitsPipeline.from_pretrained(str(ROOT / "assets" / "digits-dit"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_train_lora_changes_only_the_adapter_and_is_reproducible(dit_pipe, one_thread):
    x, y = load_digits("test")
    x, y = x[:32], y[:32]
    runs = []
    for _ in range(2):
        pipe = copy.deepcopy(dit_pipe)
        base = {k: v.clone() for k, v in pipe.backbone.state_dict().items()}
        lora.add_lora(pipe.backbone, rank=2, target_modules=["to_q", "to_v"])
        losses = lora.train_lora(pipe, x, y, 3, batch_size=8, lr=1e-2, seed=1, progress=False)
        assert len(losses) == 3 and all(0 < v < 10 for v in losses)
        state = pipe.backbone.state_dict()
        for k, v in base.items():  # peft renames wrapped weights to base_layer.*
            key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(state[key], v), k
        assert all(t.abs().sum() > 0 for k, t in lora.lora_state_dict(pipe.backbone).items() if "lora_B" in k)
        runs.append(losses)
    assert runs[0] == runs[1]


def test_train_lora_rejects_bad_input(dit_pipe, one_thread):
    pipe = copy.deepcopy(dit_pipe)
    x, y = load_digits("test")
    with pytest.raises(ValueError, match="no trainable LoRA"):
        lora.train_lora(pipe, x[:4], y[:4], 1)
    lora.add_lora(pipe.backbone, rank=2, target_modules=["to_q"])
    with pytest.raises(ValueError, match="labels has 3 entries for 4 images"):
        lora.train_lora(pipe, x[:4], y[:3], 1)
    with pytest.raises(ValueError, match="steps"):
        lora.train_lora(pipe, x[:4], y[:4], 0)
    with pytest.raises(ValueError, match="p_uncond"):
        lora.train_lora(pipe, x[:4], y[:4], 1, p_uncond=1.0)
