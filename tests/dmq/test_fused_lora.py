"""Fusing LoRA into a frozen quantized layer: peft's ``merge`` / ``unmerge`` write ``W += B A s`` into the packed
weight, which hands the delta to the layer's 16-bit ``lora_fused`` side branch (the packed codes never change)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dmq
from dmq.modules import QuantConv2d, QuantLinear
from dmq.packed_weight import PackedWeight, PackedWeightWriteError


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _frozen(preset: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = dmq.quantize(ConvLinear(), preset)
    calib = torch.randn(8, 4, 4, 4)
    dmq.calibrate(model, lambda m: m(calib))  # static activation scales (w8a8: the integer GEMM path)
    return dmq.freeze(model)


def _packed(model):
    """The quantized layers (peft builds the LoRA convolutions as float ``QuantConv2d``s, ``type(base_layer)``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight, PackedWeight)}


def _two_adapters(model):
    torch.manual_seed(1)
    targets = ["conv", "fc", "out"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                        adapter_name="first")
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    pm.base_model.set_adapter(["first", "second"])
    return pm


@pytest.mark.parametrize("preset,safe", [("w4a16", False), ("w8a8", False), ("w4a16+hadamard", True)])
def test_merge_matches_unfused_and_unmerge_restores_bits(preset, safe, one_thread):
    model = _frozen(preset)
    x = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        base = model(x)
        pm = _two_adapters(model)
        packed = {n: {k: t.clone() for k, t in m.weight.tensors().items()} for n, m in _packed(model).items()}
        assert len(packed) == 3
        unfused = pm(x)
        assert not torch.allclose(unfused, base, atol=1e-3)
        pm.base_model.merge_adapter(["first", "second"], safe_merge=safe)  # safe: peft adds into a clone
        fused = pm(x)
        # the same sum in another order: float32 rounding (measured 1.3e-7..1.8e-7 of the largest output)
        scale = unfused.abs().max()
        assert (fused - unfused).abs().max() <= 2e-6 * scale
        for n, m in _packed(model).items():
            assert m.lora_fused.dtype == m.weight.dtype and m.lora_fused.shape == m.weight.shape
            assert all(torch.equal(t, packed[n][k]) for k, t in m.weight.tensors().items())  # codes untouched
        pm.base_model.unmerge_adapter()
        assert torch.equal(pm(x), unfused)
        assert all("lora_fused" not in n for n, _ in model.named_buffers())
        pm.base_model.disable_adapter_layers()
        assert torch.equal(pm(x), base)


def test_merge_and_unload_saves_and_loads(tmp_path, one_thread):
    model = _frozen("w4a16")
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        pm = _two_adapters(model)
        unfused = pm(x)
        plain = pm.merge_and_unload()
        assert isinstance(plain.fc, QuantLinear) and isinstance(plain.conv, QuantConv2d)
        fused = plain(x)
        assert (fused - unfused).abs().max() <= 2e-6 * unfused.abs().max()
        state = plain.state_dict()
        assert {"conv.lora_fused", "fc.lora_fused", "out.lora_fused"} <= set(state)
        torch.save(state, tmp_path / "fused.pt")
        fresh = _frozen("w4a16", seed=5)  # other weights: everything comes from the checkpoint
        fresh.load_state_dict(torch.load(tmp_path / "fused.pt"))
        assert torch.equal(fresh(x), fused)
        dmq.save(plain, tmp_path / "dmq")  # the dmq format keeps the branch too
        assert torch.equal(dmq.load(ConvLinear(), tmp_path / "dmq")(x), fused)
        # a loaded branch can still take and give back a delta
        d = torch.randn_like(fresh.out.lora_fused)
        fresh.out.weight.data += d
        fresh.out.weight.data -= d
        assert torch.equal(fresh(x), fused)


def test_bad_writes_are_refused_before_anything_changes():
    model = _frozen("w4a16")
    w = model.out.weight
    x = torch.randn(2, 4, 4, 4)
    before = model(x)
    with pytest.raises(PackedWeightWriteError, match="packed weight"):
        w.data.mul_(2.0)  # only adds and subtracts have a branch to go to
    with pytest.raises(ValueError, match="shape"):
        w.data += torch.ones(3, 3)
    with pytest.raises(ValueError, match="NaN"):
        w.data += torch.full(w.shape, float("nan"))
    bare = PackedWeight(w.tensors(), w.layouts, w.dtype)  # belongs to no layer
    with pytest.raises(PackedWeightWriteError, match="no quantized layer"):
        bare += torch.zeros(w.shape)
    assert torch.equal(model(x), before) and "lora_fused" not in model.out._buffers
