"""Per-family quantization report on the tiny replicas (``tests/pipelines/tiny_pipelines.py``): W8A8 and W4A8 ε SQNR
of each denoiser, what stays in full precision, and whether attention is quantized. Writes
``benchmarks/families.json`` (rendered into ``docs/families.md`` by ``scripts/render_readme.py``).

ε SQNR: the denoiser's full-precision inputs are captured on a sampling run (every call, both CFG branches), then the
quantized denoiser (calibrated through the pipeline by ``quantize_pipeline``) is run on exactly those inputs and its
prediction compared with the full-precision one. Random tiny weights: the numbers test integration and relative
sensitivity, not image quality.

    nice python scripts/bench_families.py [--families flux wan2.2 ...] [--out benchmarks/families.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402
from dmq.modules import QuantConv2d, QuantLinear  # noqa: E402
from pipelines import quantize_pipeline  # noqa: E402
from pipelines.quantize import find_denoisers  # noqa: E402
from tests.pipelines import tiny_pipelines as tp  # noqa: E402

STEPS = 4
CONFIGS = ("w8a8", "w4a8")


def _prediction(out) -> torch.Tensor:
    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
    if isinstance(out, list):  # one tensor per sample (Z-Image)
        return torch.cat([o.float().flatten() for o in out])
    return out.float()


def _capture(rep: tp.Replica, names: list[str]) -> dict[str, list]:
    """Every denoiser call of one full-precision sampling run, with deep-copied inputs."""
    calls = {n: [] for n in names}
    handles = [getattr(rep.pipe, n).register_forward_pre_hook(
        lambda m, a, k, n=n: calls[n].append((copy.deepcopy(a), copy.deepcopy(k))), with_kwargs=True) for n in names]
    try:
        tp.generate(rep, STEPS)
    finally:
        for h in handles:
            h.remove()
    return calls


def _eps_sqnr(model: torch.nn.Module, fp_model: torch.nn.Module, calls: list) -> float:
    sig = err = 0.0
    with torch.no_grad():
        for a, k in calls:
            ref, out = _prediction(fp_model(*a, **k)), _prediction(model(*a, **k))
            sig += float(ref.double().pow(2).sum())
            err += float((ref.double() - out.double()).pow(2).sum())
    return 10 * math.log10(sig / err) if err > 0 else math.inf


def _full_precision_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]


def run_family(family: str) -> dict:
    rep = tp.build(family)
    names = list(find_denoisers(rep.pipe))
    fp_models = {n: copy.deepcopy(getattr(rep.pipe, n)) for n in names}
    calls = _capture(rep, names)
    row: dict = {"family": family, "pipeline": type(rep.pipe).__name__, "denoisers": {}}
    for config in CONFIGS:
        rep = tp.build(family)
        t0 = time.perf_counter()
        quantize_pipeline(rep.pipe, config, call_kwargs=rep.calls, num_inference_steps=STEPS,
                          guidance_scale=rep.guidance_scale, progress=False)
        seconds = time.perf_counter() - t0
        for n in names:
            model = getattr(rep.pipe, n)
            d = row["denoisers"].setdefault(n, {"class": type(model).__name__})
            d[f"{config}_eps_sqnr_db"] = round(_eps_sqnr(model, fp_models[n], calls[n]), 2)
            d[f"{config}_seconds"] = round(seconds, 2)
            if config == "w8a8":
                s = dmq.summary(model)
                d["quantized_layers"] = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())
                d["full_precision_layers"] = _full_precision_layers(model)
                d["attention_modules"] = s["attention"]
                d["attention_processors"] = sorted({type(m.matmul_quantizers.original_processor).__name__
                                                    for m in model.modules() if hasattr(m, "matmul_quantizers")})
                d["timestep_range"] = list(s["timestep_range"])
                d["unobserved"] = s["unobserved"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(tp.NEW_FAMILIES + tp.FAMILIES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "families.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for fam in args.families:
        rows.append(run_family(fam))
        print(json.dumps(rows[-1]["denoisers"], default=str)[:300], file=sys.stderr)
    import diffusers

    out = {"command": "python scripts/bench_families.py", "steps": STEPS, "configs": list(CONFIGS),
           "machine": f"{platform.machine()} CPU, 1 thread, shared by several jobs",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "families": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
