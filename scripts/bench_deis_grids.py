"""Which DEIS variant and time grid suit the bundled models: a grid study beside ``bench_samplers.py``.

    .venv/bin/python scripts/bench_deis_grids.py --out benchmarks/samplers_deis_grids.json

For each bundled model (guidance 2), the final-sample RMSE against DPM-Solver++(2M) with 250 steps from the same
noise, for DEIS variants on the power-in-t, Karras (power 7 in ρ) and uniform log-ρ grids, and for diffusers'
multistep schedulers on their three grids, at NFE 5, 8, 10 and 15. The Gaussian-mixture version of this study is
the ``gmm`` problem of ``bench_samplers.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_samplers as bs  # noqa: E402

from samplers import DEISScheduler  # noqa: E402

NFES = (5, 8, 10, 15)
# (method, degree, grid, grid power)
DEIS_VARIANTS = (
    ("tab", 3, "time", 1.0), ("tab", 3, "time", 1.5), ("tab", 3, "time", 2.0), ("tab", 3, "rho", 7.0),
    ("tab", 2, "rho", 7.0), ("tab", 3, "log_rho", None), ("ipndm", 3, "time", 1.5), ("ipndm", 3, "rho", 7.0),
    ("rhoab", 3, "time", 1.5), ("rhoab", 3, "rho", 7.0), ("rhoab", 3, "log_rho", None),
)


def deis_maker(method: str, degree: int, grid: str, power: float | None):
    kw = {"deis_method": method, "deis_order": degree, "time_grid": grid}
    if power is not None:
        kw["time_grid_power"] = power
    return lambda nfe: (DEISScheduler.from_config(bs.VP_CONFIG, **kw), nfe)


def candidates() -> dict:
    out = {}
    for method, degree, grid, power in DEIS_VARIANTS:
        label = f"DEIS {method}-{degree}" + (" (default)" if (method, degree, grid, power) == ("tab", 3, "time", 1.5)
                                              else "")
        out[f"{label}|{grid}" + ("" if power is None else f"^{power:g}")] = deis_maker(method, degree, grid, power)
    for cand in bs.diffusers_candidates():
        if cand.name not in ("Euler", "DDIM"):
            out[f"{cand.name}|{cand.grid}"] = cand.make
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--reference-steps", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "samplers_deis_grids.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(["python scripts/bench_deis_grids.py", *sys.argv[1:]]), "protocol": vars(args),
              "nfes": list(NFES), "models": {}}
    t0 = time.perf_counter()
    cands = candidates()
    for name in args.models:
        _, model, _, _, _, x_T, labels = bs._digits_setup(name, args.samples)
        ref, _ = bs.sample(DPMSolverMultistepScheduler(**bs.VP_CONFIG, timestep_spacing="trailing"),
                           args.reference_steps, model, x_T, labels, 2.0, null_label=10)
        rows = {}
        for key, make in cands.items():
            rows[key] = {}
            for nfe in NFES:
                sched, steps = make(nfe)
                x, _ = bs.sample(sched, steps, model, x_T, labels, 2.0, null_label=10)
                rmse = (x - ref).pow(2).mean().sqrt().item()
                rows[key][str(nfe)] = rmse if math.isfinite(rmse) else None
            print(name, key, [None if v is None else round(v, 4) for v in rows[key].values()], flush=True)
        report["models"][name] = rows
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
