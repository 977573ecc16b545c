"""quantize_pipeline on tiny offline replicas of every supported family, use_sampler on the quantized pipelines,
restore on failure, accelerate offloading, text-encoder weight-only quantization, and a 2-process (gloo)
calibration that must give bit-identical quantization parameters to one process.

Coverage: every family (DDPM, DDIM, SD, SDXL, DiT, PixArt-alpha, PixArt-Sigma, SD3, bundled digit U-Net and DiT)
x W8A8 (closeness to full precision, timesteps seen), and every family x {W4A8, W4A6-FP} x every sampler name
(shapes, finite). Offloading, failure, text encoders and the 2-process run use the SD replica and the bundled U-Net.
"""

from __future__ import annotations

import pytest
import torch

import dmq
from dmq.modules import QuantConv2d, QuantLinear
from pipelines import quantize_pipeline, use_sampler
from pipelines.quantize import find_backbone, restore_pipeline, shard
from pipelines.sampler_swap import sampler_names
from tests.pipelines import tiny_pipelines as tp

STEPS = 3


def _quantize(rep: tp.Replica, config: str, **kw):
    kw.setdefault("call_kwargs", rep.calls)
    return quantize_pipeline(rep.pipe, config, num_inference_steps=STEPS,
                             guidance_scale=rep.guidance_scale, progress=False, **kw)


def _expected_timesteps(pipe) -> set[float]:
    pipe.scheduler.set_timesteps(STEPS)
    return {round(float(t), 3) for t in pipe.scheduler.timesteps}


# keyword arguments diffusers' DDPMPipeline / DDIMPipeline hard-code in their scheduler.step calls
LEGACY_STEP_KWARGS = {"ddpm": ("generator",), "ddim": ("eta", "use_clipped_model_output", "generator")}


def _step_takes(scheduler, names) -> bool:
    import inspect

    params = inspect.signature(scheduler.step).parameters
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(n in params for n in names)


def _quant_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_w8a8_every_family(family, one_thread):
    rep = tp.build(family)
    fp = tp.generate(rep, STEPS)
    _quantize(rep, "w8a8")
    _, backbone = find_backbone(rep.pipe)
    summary = dmq.summary(backbone)
    assert _quant_layers(backbone) > 0 and summary["attention"] > 0 and summary["frozen"]  # SD3: joint attention
    rec = rep.pipe.dmq_calibration
    # every backbone call of both calibration runs was a calibration point, at every timestep of the schedule
    assert {round(t, 3) for t in rec.timesteps} == _expected_timesteps(rep.pipe)
    assert rec.points == len(rep.calls) * len(rep.pipe.scheduler.timesteps) and rec.processes == 1
    q = tp.generate(rep, STEPS)
    assert q.shape == fp.shape and torch.isfinite(q).all()
    rel = float((q - fp).pow(2).mean().sqrt() / fp.std())
    assert rel < 0.2, f"W8A8 relative RMS error {rel:.3f} vs full precision"


@pytest.mark.parametrize("config", ["w4a8", "w4a6-fp"])
@pytest.mark.parametrize("family", tp.FAMILIES)
def test_low_bit_and_every_sampler(family, config, one_thread):
    rep = tp.build(family)
    fp = tp.generate(rep, STEPS)
    _quantize(rep, config, call_kwargs=rep.calls[:1])
    flow, original = family == "sd3", rep.pipe.scheduler
    for name in sampler_names():
        rep.pipe.scheduler = original
        if flow and name == "ddim":
            with pytest.raises(ValueError, match="no flow-matching version"):
                use_sampler(rep.pipe, name)
            continue
        use_sampler(rep.pipe, name)
        if not _step_takes(rep.pipe.scheduler, LEGACY_STEP_KWARGS.get(family, ())):
            continue  # diffusers' DDPM/DDIMPipeline pass these to step(); UniPC's step takes none of them
        images = tp.generate(rep, STEPS)
        assert images.shape == fp.shape and torch.isfinite(images).all(), name


def test_unsupported_denoisers_are_refused_with_the_reason():
    from diffusers import DDPMScheduler, DiffusionPipeline

    class Odd(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    with pytest.raises(ValueError, match="Odd.unet is a Linear, not a diffusers ModelMixin"):
        quantize_pipeline(Odd(torch.nn.Linear(2, 2), DDPMScheduler()), call_kwargs=[{}])

    class NoBackbone(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    with pytest.raises(ValueError, match="no `unet`, `transformer` or `transformer_2` denoiser; name the denoiser"):
        quantize_pipeline(NoBackbone(DDPMScheduler()), call_kwargs=[{}])
    rep = tp.build("ddpm")
    with pytest.raises(ValueError, match="DDPMPipeline.controlnet does not exist"):
        quantize_pipeline(rep.pipe, call_kwargs=[{}], denoisers=["controlnet"])
    with pytest.raises(ValueError, match="same module as another"):
        quantize_pipeline(rep.pipe, call_kwargs=[{}], denoisers=["unet", "unet"])
    rep = tp.build("ddpm")
    with pytest.raises(ValueError, match="exactly one of prompts= .* or call_kwargs="):
        quantize_pipeline(rep.pipe)
    with pytest.raises(TypeError, match="list of dicts"):
        quantize_pipeline(rep.pipe, call_kwargs={"batch_size": 1})
    with pytest.raises(ValueError, match="unknown preset 'w3a3'"):
        quantize_pipeline(rep.pipe, "w3a3", call_kwargs=rep.calls)
    assert _quant_layers(rep.pipe.unet) == 0


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_failure_mid_calibration_restores_full_precision(error, one_thread):
    rep = tp.build("digits-unet")
    fp = tp.generate(rep, STEPS)
    calls = {"n": 0}

    def fail_on_fifth_call(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise error("interrupted")

    handle = rep.pipe.unet.register_forward_pre_hook(fail_on_fifth_call)
    with pytest.raises(error, match="interrupted"):
        _quantize(rep, "w8a8")
    handle.remove()
    assert calls["n"] == 5 and _quant_layers(rep.pipe.unet) == 0 and not hasattr(rep.pipe.unet, "_dmq")
    assert not rep.pipe.unet._forward_pre_hooks and not rep.pipe.unet._forward_hooks
    assert torch.equal(tp.generate(rep, STEPS), fp)


def test_restore_after_a_finished_quantization(one_thread):
    rep = tp.build("digits-dit")
    fp = tp.generate(rep, STEPS)
    _quantize(rep, "w8a8")  # packed: the float weights are released, so restoring is refused and changes nothing
    packed = tp.generate(rep, STEPS)
    with pytest.raises(ValueError, match="pack=False"):
        restore_pipeline(rep.pipe)
    assert torch.equal(tp.generate(rep, STEPS), packed)

    rep = tp.build("digits-dit")
    _quantize(rep, "w8a8", pack=False)
    unpacked = tp.generate(rep, STEPS)
    # the packed model runs the integer GEMM, whose roundings differ from the float fake-quant matmul (a code near a
    # rounding boundary can flip in a later layer): it stays closer to the fake-quant model than either is to FP
    err = float((unpacked - fp).pow(2).mean().sqrt())
    assert float((packed - unpacked).pow(2).mean().sqrt()) < 0.5 * err
    assert float((packed - fp).pow(2).mean().sqrt()) < 1.25 * err
    restore_pipeline(rep.pipe)
    assert _quant_layers(rep.pipe.transformer) == 0 and torch.equal(tp.generate(rep, STEPS), fp)


def test_text_encoder_weight_only(one_thread):
    rep = tp.build("sd")
    te = rep.pipe.text_encoder
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        ref = te(ids).last_hidden_state
    with pytest.raises(ValueError, match="weight-only"):
        _quantize(rep, "w8a8", text_encoders="w8a8")
    assert _quant_layers(te) == 0 and _quant_layers(rep.pipe.unet) == 0
    _quantize(rep, "w8a8", text_encoders="w8a16")
    assert rep.pipe.dmq_calibration.text_encoders == ["text_encoder"]
    assert _quant_layers(te) > 0 and not dmq.quantizers(te)  # weights only: no activation quantizer
    with torch.no_grad():
        out = te(ids).last_hidden_state
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert 25 < float(sqnr) < 200  # quantized (not identical), and close


def _offload_sequential(module):
    from accelerate import cpu_offload

    cpu_offload(module, execution_device=torch.device("cpu"))


def _offload_blocks(module):
    """What dispatch_model does for a device_map that offloads some blocks: one hook per block that loads the
    block's whole subtree (``place_submodules=True``) from a weights map."""
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader

    state = {k: v.clone() for k, v in module.state_dict().items()}
    blocks = {"down_blocks.0": True, "up_blocks.1": True, "mid_block": False}
    attach_align_device_hook_on_blocks(module, execution_device={k: torch.device("cpu") for k in blocks},
                                       offload=blocks, weights_map=OffloadedWeightsLoader(state_dict=state))


@pytest.mark.parametrize("how", ["sequential", "device_map_blocks"])
def test_offloaded_backbone_matches_the_plain_pipeline(how, one_thread):
    plain = tp.build("sd")
    _quantize(plain, "w8a8+rtn")  # learned rounding (GPTQ) is skipped on offloaded layers: compare without it
    expected = tp.generate(plain, STEPS)
    rep = tp.build("sd")
    fp = tp.generate(rep, STEPS)
    (_offload_sequential if how == "sequential" else _offload_blocks)(rep.pipe.unet)
    meta = {n for n, p in rep.pipe.unet.named_parameters() if p.device.type == "meta"}
    assert len(meta) > 50
    _quantize(rep, "w8a8+rtn")
    assert _quant_layers(rep.pipe.unet) > 0
    assert meta == {n for n, p in rep.pipe.unet.named_parameters() if p.device.type == "meta"}  # still offloaded
    torch.testing.assert_close(tp.generate(rep, STEPS), expected, rtol=0, atol=1e-6)
    restore_pipeline(rep.pipe)  # the float modules come back and run through their hooks
    assert _quant_layers(rep.pipe.unet) == 0
    torch.testing.assert_close(tp.generate(rep, STEPS), fp, rtol=0, atol=1e-6)


def test_offloaded_failure_restores_the_hooked_modules(one_thread):
    rep = tp.build("sd")
    fp = tp.generate(rep, STEPS)
    _offload_sequential(rep.pipe.unet)
    bad = [*rep.calls, {"prompt_embeds": torch.zeros(1, 6, 5), "guidance_scale": 1.0}]  # wrong width: call 3 fails
    with pytest.raises(RuntimeError):
        _quantize(rep, "w8a8", call_kwargs=bad)
    assert _quant_layers(rep.pipe.unet) == 0
    assert all(p.device.type == "meta" for p in rep.pipe.unet.parameters())
    torch.testing.assert_close(tp.generate(rep, STEPS), fp, rtol=0, atol=1e-6)


def test_model_offload_hook_keeps_working(one_thread):
    from accelerate import cpu_offload_with_hook

    plain = tp.build("digits-dit")
    _quantize(plain, "w8a8")
    expected = tp.generate(plain, STEPS)
    rep = tp.build("digits-dit")
    _, hook = cpu_offload_with_hook(rep.pipe.transformer, execution_device=torch.device("cpu"))
    _quantize(rep, "w8a8")
    assert hasattr(rep.pipe.transformer, "_hf_hook")
    torch.testing.assert_close(tp.generate(rep, STEPS), expected, rtol=0, atol=0)
    hook.remove()


def test_shard_splits_like_accelerate():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard(items[:1], 1, 2) == []


# --------------------------------------------------------------------------------------- 2-process calibration
N_CALLS = 4


def _frozen_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("scale", "zero_point"))}


def _calibrate(world: int, rank: int) -> dict[str, torch.Tensor]:
    rep = tp.build("sd")
    calls = tp._text_calls(N_CALLS, 6, 16)
    quantize_pipeline(rep.pipe, "w8a8", call_kwargs=calls, num_inference_steps=STEPS, guidance_scale=3.0,
                      progress=False)
    assert rep.pipe.dmq_calibration.calls == len(shard(calls, rank, world))
    assert rep.pipe.dmq_calibration.points == N_CALLS * (STEPS + 1)  # PNDM/PLMS runs one extra step
    return _frozen_params(rep.pipe.unet)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_calibrate(world, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_calibration_equals_one_process(tmp_path, one_thread):
    import torch.multiprocessing as mp

    # fork: the children reuse the parent's imports (spawn would re-import torch, diffusers and transformers twice)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = _calibrate(1, 0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert single.keys() == ranks[0].keys() == ranks[1].keys() and len(single) > 20
    for name, value in single.items():
        # bit-identical: the reduced statistics are extrema and integer counts (see dmq.sync)
        assert torch.equal(ranks[0][name], value) and torch.equal(ranks[1][name], value), name
    # and the reduction mattered: half the calls alone give other scales
    half = tp.build("sd")
    quantize_pipeline(half.pipe, "w8a8", call_kwargs=tp._text_calls(N_CALLS, 6, 16)[:2], num_inference_steps=STEPS,
                      guidance_scale=3.0, progress=False)
    alone = _frozen_params(half.pipe.unet)
    assert any(not torch.equal(alone[n], single[n]) for n in single)
