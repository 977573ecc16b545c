"""quantize_pipeline, use_sampler and save / reload end to end on the newer families' tiny replicas: Flux (a flow
transformer fed t / 1000, dynamic shifting, attention_dispatch processors) and Wan 2.2 (two experts, video
latents, flow shift). Each: W8A8 and W4A8 with an SQNR bound against full precision, the bins over the range the
model really receives, DEIS and DC-Solver sampling, and a reload that reproduces the quantized pipeline bit for
bit."""

from __future__ import annotations

import math

import pytest
import torch

import dmq
from pipelines import load_quantized, quantize_pipeline, save_quantized, use_sampler
from tests.dmq.helpers import sqnr
from tests.pipelines import tiny_pipelines as tp

STEPS = 4
# W8A8 / W4A8 SQNR floors of the decoded output against full precision (random tiny weights; measured 63 dB Flux
# and > 100 dB Wan at W8A8; the floors leave room for the W4 weight grid)
FLOORS = {"w8a8": 30.0, "w4a8": 15.0}


def _quantize(rep: tp.Replica, config: str, **kw) -> None:
    quantize_pipeline(rep.pipe, config, call_kwargs=rep.calls, num_inference_steps=STEPS,
                      guidance_scale=rep.guidance_scale, progress=False, **kw)


@pytest.mark.parametrize("config", ["w8a8", "w4a8"])
@pytest.mark.parametrize("family", tp.NEW_FAMILIES)
def test_family_end_to_end(family, config, tmp_path, one_thread):
    rep = tp.build(family)
    fp = tp.generate(rep, STEPS)
    _quantize(rep, config)
    rec = rep.pipe.dmq_calibration
    q = tp.generate(rep, STEPS)
    assert q.shape == fp.shape and sqnr(fp, q) >= FLOORS[config], f"{family} {config}: {sqnr(fp, q):.1f} dB"
    for name, info in rec.denoisers.items():
        model = getattr(rep.pipe, name)
        assert info["points"] > 0 and dmq.summary(model)["frozen"]
        assert dmq.summary(model)["attention"] > 0  # attention_dispatch processors are quantized
        lo, hi = info["timestep_range"]
        assert lo <= min(info["timesteps"]) and max(info["timesteps"]) <= hi
        if "timestep_range" in rep.extra:  # the bins follow the family's timestep convention (t / 1000 or raw t)
            assert info["timestep_range"] == rep.extra["timestep_range"]
    expect = rep.extra.get("calibration_timesteps")  # closed form of the family's schedule, where it has one
    if expect is not None:
        for name, timesteps in expect.items():  # denoiser -> steps -> the timesteps it is fed
            assert rec.denoisers[name]["timesteps"] == pytest.approx(sorted(timesteps(STEPS)), rel=1e-5, abs=1e-4)
    if family == "flux":  # t / 1000: the bins lie on [0, 1], and the calibration timesteps fill all four
        info = rec.denoisers["transformer"]
        assert info["timestep_range"] == [0.0, 1.0]
        bins = dmq.calibration.timestep_bins(torch.tensor(info["timesteps"]), 4, 0.0, 1.0)
        assert len(set(bins.tolist())) >= 3
    if family == "wan2.2":  # each expert calibrated on its own side of the boundary, with its own statistics
        hi_t, lo_t = rec.denoisers["transformer"]["timesteps"], rec.denoisers["transformer_2"]["timesteps"]
        boundary = 0.6 * 1000
        assert min(hi_t) >= boundary > max(lo_t)
    if family == "svd":  # EDM's c_noise = log(sigma)/4 over the Karras sigmas [0.002, 700]: the bins span it
        lo, hi = rec.denoisers["unet"]["timestep_range"]
        assert lo == pytest.approx(math.log(0.002) / 4, rel=1e-6) and hi == pytest.approx(math.log(700) / 4, rel=1e-6)
    save_quantized(rep.pipe, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    again = tp.generate(tp.Replica(loaded, rep.calls, rep.generate, rep.guidance_scale), STEPS)
    assert torch.equal(again, q)
    for sampler in ("deis", "dc-solver"):
        use_sampler(rep.pipe, sampler)
        out = tp.generate(rep, STEPS)
        assert out.shape == fp.shape and torch.isfinite(out).all(), sampler


def test_wan22_experts_can_be_named_one_by_one(one_thread):
    rep = tp.build("wan2.2")
    _quantize(rep, "w8a8", denoisers=["transformer_2"])
    assert getattr(rep.pipe.transformer, "_dmq", None) is None
    assert dmq.summary(rep.pipe.transformer_2)["frozen"]
