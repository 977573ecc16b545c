"""Measure the default full-precision list of ``dmq.config.DEFAULT_KEEP_FP`` on the bundled U-Net and DiT.

    .venv/bin/python scripts/bench_keep_fp.py --out benchmarks/quant_keep_fp.json

For each preset, the ε SQNR against full precision (inputs captured from an FP sampling trajectory, as in
``bench_quant.py``) with the default list, and with one group of the list quantized as well: the adaLN modulation
linears, the U-Net's per-resnet time projections, the time/class embedders, and the first/last layers. The
weights each group holds are counted, so the table shows what keeping it in full precision costs in memory.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_quant as bq  # noqa: E402

import dmq  # noqa: E402
from dmq.config import DEFAULT_KEEP_FP  # noqa: E402

GROUPS = {
    "adaLN modulation": ("*norm1.linear", "*norm1_context.linear", "*norm.linear"),
    "U-Net time projections": ("*time_emb_proj",),
    "time / class embedders": ("*time_embedding*", "*time_proj*", "*timestep_embedder*", "*class_embedding*",
                               "*class_embedder*", "*.emb.*"),
    "first / last layers": ("conv_in", "conv_out", "proj_out", "proj_out_*", "*pos_embed*", "*norm_out*"),
}


class TrajectoryInputs:
    """The FP backbone's inputs and ε outputs at evenly spaced calls of one sampling run, plus a calibration loop."""

    def __init__(self, pipe, calls: int, rows: int, calib_samples: int, calib_steps: int):
        self.pipe, self.fp_model = pipe, pipe.backbone
        self.inputs = bq.capture_inputs(pipe, torch.arange(10), 20, keep=calls, rows=rows)
        self.fp_eps = bq.eps_outputs(self.fp_model, self.inputs)
        self.calib_samples, self.calib_steps = calib_samples, calib_steps

    def calib_loop(self, model: torch.nn.Module) -> None:
        bq.set_backbone(self.pipe, model)
        try:
            bq.sample(self.pipe, torch.arange(self.calib_samples) % 10, self.calib_steps, seed=20_000)
        finally:
            bq.set_backbone(self.pipe, self.fp_model)

    def sqnr(self, config: dmq.QuantConfig) -> float:
        model = dmq.quantize(self.fp_model, config, inplace=False)
        dmq.calibrate(model, self.calib_loop)
        dmq.freeze(model)
        return bq.eps_sqnr_by_bin(self.fp_eps, bq.eps_outputs(model, self.inputs), self.inputs)["all"]


def group_params(model: torch.nn.Module, globs: tuple[str, ...]) -> int:
    """Weights of the Linear/Conv2d layers whose names match ``globs``."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(fnmatch.fnmatchcase(n, g) for g in globs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    ap.add_argument("--presets", nargs="+", default=["w8a8", "w4a8", "w4a6-fp"])
    ap.add_argument("--calls", type=int, default=12, help="FP backbone calls whose inputs measure ε SQNR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quant_keep_fp.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(["python scripts/bench_keep_fp.py", *sys.argv[1:]]), "protocol": vars(args),
              "groups": {g: list(v) for g, v in GROUPS.items()}, "models": {}}
    t0 = time.perf_counter()
    for kind in args.models:
        data = TrajectoryInputs(bq.load_pipe(kind), args.calls, rows=20, calib_samples=10, calib_steps=10)
        total = group_params(data.fp_model, ("*",))
        rows = {}
        for g, globs in GROUPS.items():
            n = group_params(data.fp_model, globs)
            if n:
                rows[g] = {"params": n, "param_share": n / total, "delta_sqnr_db": {}}
        base = {}
        for preset in args.presets:
            cfg = dmq.get_config(preset)
            base[preset] = data.sqnr(cfg)
            for g in rows:
                keep = tuple(k for k in DEFAULT_KEEP_FP if k not in GROUPS[g])
                rows[g]["delta_sqnr_db"][preset] = data.sqnr(cfg.replace(keep_fp=keep)) - base[preset]
            print(f"[{kind}] {preset}: {base[preset]:.2f} dB; " + ", ".join(
                f"{g} {r['delta_sqnr_db'][preset]:+.2f}" for g, r in rows.items()), flush=True)
        report["models"][kind] = {"default_sqnr_db": base, "groups": rows}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
