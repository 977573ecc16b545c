"""The schedule-search objective (``search_schedule(objective=...)``) on Gaussian-mixture cells of
``scripts/bench_schedules.py``: the same mixtures, search latents (24, 8 held out), solver variants (``"auto"``) and
32 evaluation latents, with the exact PF-ODE reference. Per cell and solver: evaluation RMSE of the default grid and
of the schedule searched with each objective (and whether the held-out check accepted it).

    nice python scripts/bench_schedule_objectives.py --cells 0:2:5,0:2:6 [--solvers DEIS,UniPC] --out FILE

A cell is ``mixture:guidance:nfe`` (mixture = index into ``bench_schedules.MIXTURES``). Rows are appended to ``--out``
(default ``benchmarks/samplers_objectives.json``). The machine is shared: times are indicative only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_samplers as bs  # noqa: E402
import bench_schedules as bsch  # noqa: E402

from pipelines.dc_search import gmm_denoise  # noqa: E402
from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample  # noqa: E402
from samplers import DCSolverScheduler, DEISScheduler, search_schedule  # noqa: E402
from samplers.schedule_search import OBJECTIVES  # noqa: E402

OUT = bsch.ROOT / "benchmarks" / "samplers_objectives.json"
SOLVERS = {"DEIS": DEISScheduler, "UniPC": DCSolverScheduler}


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def cell_row(mixture: int, g: float, n: int, solvers: list[str]) -> dict:
    C, K, shape, seed = bsch.MIXTURES[mixture]
    model = GMMDenoiser(GaussianMixture.random(C, K, shape, seed=seed))
    gen = torch.Generator().manual_seed(100 + seed)  # as bench_schedules.gmm_part with 24 search latents
    x_s = torch.randn(24, *shape, generator=gen, dtype=torch.float64)
    x_e = torch.randn(32, *shape, generator=gen, dtype=torch.float64)
    lab_s, lab_e = torch.arange(24) % C, torch.arange(32) % C
    den = gmm_denoise(model, lab_s, g)
    final_s, final_e = reference_sample(model, x_s, lab_s, g), reference_sample(model, x_e, lab_e, g)
    row: dict = {"cell": [mixture, g, n]}
    for name in solvers:
        cls = SOLVERS[name]
        row[f"{name} default"] = _rmse(bs.sample(cls.from_config(bs.VP_CONFIG), n, model, x_e, lab_e, g)[0], final_e)
        for objective in OBJECTIVES:
            t0 = time.perf_counter()
            sched = cls.from_config(bs.VP_CONFIG)
            r = search_schedule(den, sched, x_s, n, reference=final_s, held_out=8, progress=False, variants="auto",
                                objective=objective)
            row[f"{name} {objective}"] = [round(_rmse(bs.sample(sched, n, model, x_e, lab_e, g)[0], final_e), 5),
                                          r.accepted, round(time.perf_counter() - t0, 1)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", required=True, help="comma-separated mixture:guidance:nfe")
    ap.add_argument("--solvers", default="DEIS,UniPC")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {
        "command": "nice python scripts/bench_schedule_objectives.py", "rows": []}
    for cell in args.cells.split(","):
        m, g, n = cell.split(":")
        row = cell_row(int(m), float(g), int(n), args.solvers.split(","))
        row["commit"] = bsch.COMMIT
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
