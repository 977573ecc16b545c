"""Fault injection: an exception (or ``KeyboardInterrupt``) raised at every stage boundary of quantize_pipeline,
dmq.load and dmq.save must reach the caller unchanged and leave the pipeline, the model and the file exactly as
they were.

A census run counts the boundaries (each module swap, attention-processor swap, calibration call, statistics sync,
quantizer freeze, layer pack, hook removal; each load and save step); then one run per boundary raises there. Every
run is one case: a changed module, tensor, hook or attribute, or another exception than the injected one, fails.
"""

import os

import pytest
import torch

import dmq
import dmq.api
import dmq.integrity
import dmq.serialization
from dmq.calibration import TimestepHook
from dmq.modules import PackedMixin
from dmq.quantizer import TensorQuantizer
from pipelines import quantize_pipeline
from tests.pipelines.tiny_pipelines import build, generate

# cheap min-max scales: the boundaries matter here, not the scale search
CFG = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), act=dmq.QuantSpec("int8", timestep_bins=2),
                      attn=dmq.QuantSpec("int8"), name="fault-w8a8")
TE_CFG = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), name="fault-w8a16")
INCLUDE = ["down_blocks.0.attentions.0.transformer_blocks.0.attn*", "up_blocks.1.resnets.0.*", "mid_block.resnets.0.*"]


class Fault(Exception):
    pass


class Injector:
    """Counts calls of the wrapped callables and raises at call number ``target``."""

    def __init__(self):
        self.count, self.target, self.error, self.where = 0, None, None, []

    def tick(self, where: str) -> None:
        self.count += 1
        self.where.append(where)
        if self.count == self.target:
            raise self.error

    def wrap(self, monkeypatch, owner, attr: str) -> None:
        fn = getattr(owner, attr)
        label = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"

        def wrapped(*args, **kwargs):
            self.tick(label)
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapped)

    def arm(self, target: int) -> BaseException:
        self.count, self.target, self.where = 0, target, []
        self.error = KeyboardInterrupt() if target % 3 == 0 else Fault(f"injected at boundary {target}")
        return self.error


def _fingerprint(*objects) -> dict:
    """Module structure, every tensor (bitwise), hook counts and dmq attributes of each module tree."""
    out = {}
    for i, root in enumerate(objects):
        for name, m in root.named_modules():
            key = f"{i}:{name}"
            out[key + ":type"] = type(m)
            out[key + ":hooks"] = (len(m._forward_pre_hooks), len(m._forward_hooks))
            out[key + ":attrs"] = sorted(k for k in vars(m) if "dmq" in k or k in ("matmul_quantizers", "processor"))
            proc = getattr(m, "processor", None)
            out[key + ":processor"] = type(proc)
        for k, v in root.state_dict(keep_vars=True).items():
            out[f"{i}:{k}"] = (v.dtype, v.device, v.detach().clone())
    return out


def _assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))[:5]
    for k, v in before.items():
        w = after[k]
        if isinstance(v, tuple) and len(v) == 3 and isinstance(v[2], torch.Tensor):
            assert v[:2] == w[:2] and torch.equal(v[2], w[2]), k
        else:
            assert v == w, k


def _pipeline_points(monkeypatch, inj: Injector) -> None:
    inj.wrap(monkeypatch, dmq.api, "_set_child")  # each layer swap
    inj.wrap(monkeypatch, dmq.api, "AttentionQuantizers")  # each attention-processor swap
    inj.wrap(monkeypatch, dmq, "sync_statistics")
    inj.wrap(monkeypatch, dmq, "freeze")
    inj.wrap(monkeypatch, TensorQuantizer, "frozen_params")
    inj.wrap(monkeypatch, TensorQuantizer, "freeze")
    inj.wrap(monkeypatch, PackedMixin, "pack")
    inj.wrap(monkeypatch, TimestepHook, "remove")


def test_every_boundary_of_quantize_pipeline_rolls_back(monkeypatch, one_thread):
    rep = build("sd")
    pipe = rep.pipe
    kwargs = {"call_kwargs": rep.calls[:1], "num_inference_steps": 2, "guidance_scale": rep.guidance_scale,
              "text_encoders": TE_CFG, "include": INCLUDE, "progress": False}
    inj = Injector()
    _pipeline_points(monkeypatch, inj)
    pipe.unet.register_forward_pre_hook(lambda m, a: inj.tick("unet call"))  # each calibration call
    image = generate(rep, 2)
    before = _fingerprint(pipe.unet, pipe.text_encoder)
    attrs = set(vars(pipe))

    census = build("sd")
    census.pipe.unet.register_forward_pre_hook(lambda m, a: inj.tick("unet call"))
    inj.arm(0)  # never reached: counts
    quantize_pipeline(census.pipe, CFG, **{**kwargs, "call_kwargs": census.calls[:1]})
    total, where = inj.count, list(inj.where)
    kinds = {w.split(".")[-1] for w in where}
    # (the timestep hook stays after freeze: each quantized model sets its own active call, issue 14)
    assert {"_set_child", "AttentionQuantizers", "unet call", "sync_statistics", "frozen_params", "pack"} <= kinds
    # the calibration calls: PNDM (skip_prk_steps) runs its first step twice, so 3 backbone calls per 2-step run;
    # one observer run, and one input-capture run for the GPTQ of the one-token-per-sample layers (time embedding)
    st = census.pipe.unet._dmq
    assert st.per_sample and st.report["cache_passes"] == 1
    assert where.count("unet call") == 3 * 2

    failures = []
    for k in range(1, total + 1):
        error = inj.arm(k)
        try:
            quantize_pipeline(pipe, CFG, **kwargs)
            failures.append(f"boundary {k} ({where[k - 1]}): no exception")
            continue
        except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt is injected too)
            if e is not error:
                failures.append(f"boundary {k} ({where[k - 1]}): {type(e).__name__}: {e} instead of the fault")
        try:
            _assert_unchanged(before, _fingerprint(pipe.unet, pipe.text_encoder))
            assert set(vars(pipe)) == attrs and getattr(pipe.unet, "_dmq", None) is None
        except AssertionError as e:
            failures.append(f"boundary {k} ({where[k - 1]}): state changed: {e}")
    assert not failures, failures[:10]
    assert total > 40
    assert torch.equal(generate(rep, 2), image)
    # the rolled-back pipeline quantizes exactly like a fresh one
    inj.arm(0)
    quantize_pipeline(pipe, CFG, **kwargs)
    assert torch.equal(generate(rep, 2), generate(census, 2))


@pytest.fixture(scope="module")
def frozen_dit():
    from tests.dmq.helpers import backbone_loop, tiny_dit

    model = dmq.quantize(tiny_dit(), CFG.replace(attn=None))
    dmq.calibrate(model, backbone_loop(model, [100, 600]))
    return dmq.freeze(model)


def test_every_step_of_load_and_save_rolls_back(frozen_dit, monkeypatch, tmp_path, one_thread):
    from tests.dmq.helpers import tiny_dit

    path = tmp_path / "m.safetensors"
    dmq.save(frozen_dit, path)
    old = path.read_bytes()
    previous = tmp_path / "previous.safetensors"  # a different checkpoint, to overwrite below
    dmq.save(dmq.freeze(dmq.quantize(tiny_dit(1), "w4a16")), previous)
    inj = Injector()
    for owner, attr in [(dmq.serialization, "_set_child"), (dmq.serialization, "_load_tensors"),
                        (dmq.serialization, "TimestepHook"), (PackedMixin, "_setup_exec"),
                        (PackedMixin, "set_packed"), (torch.nn.Module, "load_state_dict")]:
        inj.wrap(monkeypatch, owner, attr)
    model = tiny_dit()
    before = _fingerprint(model)
    inj.arm(0)
    dmq.load(tiny_dit(), path)
    total = inj.count
    assert total > 10
    for k in range(1, total + 1):
        error = inj.arm(k)
        with pytest.raises(type(error)) as err:
            dmq.load(model, path)
        assert err.value is error
        _assert_unchanged(before, _fingerprint(model))
        assert getattr(model, "_dmq", None) is None

    # save: each step of the atomic write; the previous file stays whole, no temporary file is left
    other = tmp_path / "other.safetensors"
    inj2 = Injector()
    for owner, attr in [(dmq.serialization, "quantization_map"), (dmq.integrity, "seal"),
                        (dmq.integrity, "tensor_digest"), (dmq.integrity, "_fsync"), (os, "chmod"), (os, "replace")]:
        inj2.wrap(monkeypatch, owner, attr)
    import safetensors.torch
    inj2.wrap(monkeypatch, safetensors.torch, "save_file")
    inj2.arm(0)
    dmq.save(frozen_dit, other)
    total, new, old = inj2.count, other.read_bytes(), previous.read_bytes()
    path.write_bytes(old)
    assert total >= 6 and new != old
    state = _fingerprint(frozen_dit)
    replaced = []
    for k in range(1, total + 1):
        error = inj2.arm(k)
        with pytest.raises(type(error)) as err:
            dmq.save(frozen_dit, path)
        assert err.value is error
        data = path.read_bytes()
        assert data in (old, new), f"save step {k} ({inj2.where[-1]}) left a damaged file"
        if data == new:  # only a fault after the rename (the folder's fsync) finds the new file complete
            replaced.append(inj2.where[-1])
            path.write_bytes(old)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "other.safetensors",
                                                              "previous.safetensors"]
        _assert_unchanged(state, _fingerprint(frozen_dit))
    assert replaced == ["dmq.integrity._fsync"]
