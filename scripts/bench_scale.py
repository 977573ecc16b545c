"""Full-size backbones with random weights: whole-model memory, quantization time and peak RSS per preset.

    nice .venv/bin/python scripts/bench_scale.py --out benchmarks/scale.json

Architectures at full width (no weights can be downloaded here, so they are random, seeded): DiT-XL/2 (28 blocks),
PixArt-Σ (28 blocks), the SD 1.5 U-Net and Flux-dev (19 double + 38 single blocks). ``--depth`` builds a fraction of
each repeated block list (at least one block) and extrapolates the whole-model bytes from the measured per-block
bytes. Each (model, preset) runs in its own subprocess, so that its peak RSS is its own:

- whole-backbone resident bytes (every parameter and buffer after ``dmq.freeze``) and checkpoint bytes
  (``dmq.save``) against the BF16 model, and the kernel state held beside them (:func:`dmq.kernels.kernel_bytes`:
  row sums and scales; no weight copy unless :func:`dmq.kernels.prepack_weights` asks for one);
- ``dmq.quantize``, ``dmq.calibrate`` (a few backbone calls at spread timesteps) and ``dmq.freeze`` time;
- peak RSS while quantizing (VmHWM reset after the BF16 model is built, and between the stages) minus the RSS of
  the interpreter and libraries (measured after every import, diffusers' lazy model modules included, before the
  model exists), against the BF16 model's bytes, overall and per stage;
- ε SQNR of the quantized model against the BF16 model on held-out inputs.

A preset may carry a whole-model memory budget (``w4a16@4.8bits``: ``QuantConfig.memory_budget``).
``--size-only`` presets are quantized and frozen with round-to-nearest and one calibration call: their bytes are
exact, their accuracy is not reported.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("dit-xl-2", "pixart-sigma", "sd15-unet", "flux-dev")
# the repeated block lists of each model and their full-size lengths (the run may build fewer, --depth)
FULL_DEPTH = {"dit-xl-2": {"transformer_blocks": 28}, "pixart-sigma": {"transformer_blocks": 28},
              "flux-dev": {"transformer_blocks": 19, "single_transformer_blocks": 38}}


def build(name: str, depth: float = 1.0) -> torch.nn.Module:
    """The model at full width; with ``depth < 1`` each repeated block list is cut to that fraction (at least 1)."""
    import diffusers as d

    torch.manual_seed(0)
    n = {k: max(1, round(v * depth)) for k, v in FULL_DEPTH.get(name, {}).items()}
    if name == "dit-xl-2":
        m = d.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                    num_layers=n["transformer_blocks"], sample_size=32, patch_size=2,
                                    num_embeds_ada_norm=1000)
    elif name == "pixart-sigma":
        m = d.PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                       num_layers=n["transformer_blocks"], sample_size=128, patch_size=2,
                                       cross_attention_dim=1152,
                                       caption_channels=4096, use_additional_conditions=False,
                                       interpolation_scale=2)
    elif name == "sd15-unet":
        m = d.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    elif name == "flux-dev":
        m = d.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=n["transformer_blocks"],
                                     num_single_layers=n["single_transformer_blocks"],
                                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    else:
        raise ValueError(f"unknown model {name!r}; known: {MODELS}")
    return m.to(torch.bfloat16).eval()


def inputs(name: str, seed: int, tokens_side: int) -> dict:
    """One backbone call (batch 1) at a timestep drawn from ``seed``; ``tokens_side``: latent side in patches."""
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16

    def r(*s):
        return torch.randn(*s, generator=g).to(bf)

    t = torch.randint(20, 980, (1,), generator=g)
    side = 2 * tokens_side
    if name == "dit-xl-2":
        return {"hidden_states": r(1, 4, side, side), "timestep": t, "class_labels": t % 1000}
    if name == "pixart-sigma":
        return {"hidden_states": r(1, 4, side, side), "encoder_hidden_states": r(1, 16, 4096), "timestep": t,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if name == "sd15-unet":
        return {"sample": r(1, 4, 4 * tokens_side, 4 * tokens_side), "timestep": t,
                "encoder_hidden_states": r(1, 16, 768)}
    n = tokens_side * tokens_side  # flux-dev
    return {"hidden_states": r(1, n, 64), "encoder_hidden_states": r(1, 16, 4096), "pooled_projections": r(1, 768),
            "img_ids": torch.zeros(n, 3), "txt_ids": torch.zeros(16, 3), "timestep": t.to(bf) / 1000,
            "guidance": torch.full((1,), 3.5, dtype=bf)}


def output(model: torch.nn.Module, kw: dict) -> torch.Tensor:
    out = model(**kw, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def one_case(name: str, preset: str, args) -> dict:
    """Runs in the subprocess."""
    import dmq

    torch.set_num_threads(args.threads)
    import dmq.budget  # noqa: F401 -- what quantizing imports on the way counts as libraries, not as the model
    import dmq.rounding  # noqa: F401
    import dmq.transforms  # noqa: F401

    with torch.device("meta"):  # imports diffusers' lazily loaded model modules, with no weights
        build(name, args.depth)
    _reset_peak()
    libs_rss = _status("VmRSS")
    fp = build(name, args.depth)
    bf16 = model_bytes(fp)
    lists = FULL_DEPTH.get(name, {})
    block_bf16 = {k: model_bytes(getattr(fp, k)[0]) for k in lists}
    calib = [inputs(name, 100 + i, args.tokens) for i in range(args.calib_calls)]
    evals = [inputs(name, 200 + i, args.tokens) for i in range(args.eval_calls)]
    size_only = preset in args.size_only
    with torch.no_grad():
        ref = [output(fp, kw).float() for kw in evals] if not size_only else []
    base, _, budget = preset.partition("@")  # "w4a16@4.8bits": the preset under a whole-model memory budget
    cfg = dmq.get_config(base)
    if budget:
        cfg = cfg.replace(memory_budget=budget)
    if size_only:
        cfg = cfg.replace(rounding="rtn", per_sample_rounding="rtn")
        calib = calib[:1]
    _reset_peak()
    base_rss = _status("VmRSS")
    stage_peaks = {}  # the high-water mark of each stage (VmHWM is reset between them; the peak is their max)
    t0 = time.perf_counter()
    dmq.quantize(fp, cfg)
    stage_peaks["quantize"] = _status("VmHWM")
    t1 = time.perf_counter()
    _reset_peak()
    dmq.calibrate(fp, lambda m: [output(m, kw) for kw in calib])
    stage_peaks["calibrate"] = _status("VmHWM")
    t2 = time.perf_counter()
    _reset_peak()
    dmq.freeze(fp)
    stage_peaks["freeze"] = _status("VmHWM")
    t3 = time.perf_counter()
    peak = max(stage_peaks.values())
    res = {"model": name, "preset": preset, "size_only": size_only, "params": sum(p.numel() for p in fp.parameters()),
           "bf16_bytes": bf16, "resident_bytes": model_bytes(fp), "quantize_s": t1 - t0, "calibrate_s": t2 - t1,
           "freeze_s": t3 - t2, "calibration_calls": len(calib), "libs_rss_bytes": libs_rss,
           "rss_before_bytes": base_rss, "peak_rss_bytes": peak,
           "peak_rss_vs_bf16": (peak - libs_rss) / bf16,
           "stage_peak_rss_vs_bf16": {k: (v - libs_rss) / bf16 for k, v in stage_peaks.items()}}
    if not size_only:
        with torch.no_grad():
            out = [output(fp, kw).float() for kw in evals]
        s = sum(float(r.double().pow(2).sum()) for r in ref)
        e = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out))
        res["eps_sqnr_db"] = 10 * torch.log10(torch.tensor(s / max(e, 1e-30))).item()
    with tempfile.TemporaryDirectory() as d:
        dmq.save(fp, Path(d) / "model.safetensors")
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    res["kernel_bytes"] = dmq.kernels.kernel_bytes(fp)  # kernel state beside the packed tensors (no weight copies)
    res["resident_vs_bf16"] = res["resident_bytes"] / bf16
    res["resident_with_kernels_vs_bf16"] = (res["resident_bytes"] + res["kernel_bytes"]) / bf16
    res["checkpoint_vs_bf16"] = res["checkpoint_bytes"] / bf16
    if lists:
        res.update(extrapolate(fp, lists, bf16, block_bf16, res["resident_bytes"], res["checkpoint_bytes"]))
    return res


def extrapolate(model: torch.nn.Module, lists: dict[str, int], bf16: int, block_bf16: dict[str, int],
                resident: int, checkpoint: int) -> dict:
    """Per-block bytes (quantized and BF16) of each repeated block list, and the whole model at full depth: the
    shared part (embedders, first / last layers) plus the full number of blocks at the measured per-block bytes.
    The checkpoint is extrapolated by the resident bytes of the blocks (both store the same packed tensors)."""
    built = {k: len(getattr(model, k)) for k in lists}
    block_q = {k: model_bytes(getattr(model, k)[0]) for k in lists}
    grow_q = sum((lists[k] - built[k]) * block_q[k] for k in lists)
    grow_bf = sum((lists[k] - built[k]) * block_bf16[k] for k in lists)
    full_bf = bf16 + grow_bf
    return {"built_blocks": built, "full_blocks": dict(lists),
            "block_vs_bf16": {k: block_q[k] / block_bf16[k] for k in lists}, "full_bf16_bytes": full_bf,
            "full_resident_vs_bf16": (resident + grow_q) / full_bf,
            "full_checkpoint_vs_bf16": (checkpoint + grow_q) / full_bf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--presets", nargs="+", default=["w4a16", "nvfp4", "w8a8"])
    ap.add_argument("--size-only", nargs="*", default=["w4a8", "mxfp4"])
    ap.add_argument("--depth", type=float, default=1.0,
                    help="fraction of the repeated blocks to build (full width); sizes are extrapolated per block")
    ap.add_argument("--tokens", type=int, default=8, help="latent side in patches (8: 64 tokens per call)")
    ap.add_argument("--calib-calls", type=int, default=2)
    ap.add_argument("--eval-calls", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=None,
                    help="explicit MODEL:PRESET[@BUDGET][:size] list ('dit-xl-2:w4a16@4.8bits:size'), run in this "
                         "order (default: every model x preset); ':size' makes that case size-only")
    ap.add_argument("--case", nargs=2, metavar=("MODEL", "PRESET"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "scale.json"))
    ap.add_argument("--append", action="store_true",
                    help="add to the cases already in --out (a case of the same model, preset and depth is replaced)")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(one_case(*args.case, args)))
        return
    command = " ".join(["python scripts/bench_scale.py", *sys.argv[1:]])
    report = {"command": command, "protocol": vars(args),
              "machine": f"{os.cpu_count()} CPU cores shared with other jobs", "cases": []}
    out = Path(args.out)
    if args.append and out.exists():  # several runs (one per model, say) in one file
        report = json.loads(out.read_text())
        report["command"] = f"{report['command']}; {command}"
        report["seconds"] = report.get("seconds", 0.0)
    t0 = time.perf_counter() - report.get("seconds", 0.0)
    cases = [(c.split(":") + [""])[:3] for c in args.cases] if args.cases else [
        (m, p, "size" if p in args.size_only else "") for m in args.models
        for p in list(args.presets) + list(args.size_only)]
    for name, preset, size in cases:
        cmd = [sys.executable, __file__, "--case", name, preset, "--tokens", str(args.tokens),
               "--calib-calls", str(args.calib_calls), "--eval-calls", str(args.eval_calls),
               "--threads", str(args.threads), "--depth", str(args.depth), "--size-only", *([preset] if size else [])]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if p.returncode != 0:
            print(f"[{name}] {preset} failed:\n{p.stderr[-3000:]}", flush=True)
            report["cases"].append({"model": name, "preset": preset, "depth": args.depth, "error": p.stderr[-1000:]})
            out.write_text(json.dumps(report, indent=2))
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["depth"] = args.depth
        report["cases"] = [c for c in report["cases"] if (c["model"], c["preset"], c.get("depth")) !=
                           (name, preset, args.depth)] + [res]
        print(f"[{name}] {preset}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in res.items() if isinstance(v, float)), flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
