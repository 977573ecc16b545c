"""Search DC-Solver ratios on a grid of (NFE, guidance), fit the cascade polynomial regression, save it as JSON.

    python scripts/search_dc.py --model gmm --out benchmarks/dc_cpr_gmm.json
    python scripts/search_dc.py --model assets/digits-unet          # writes assets/digits-unet/dc_cpr.json

``gmm``: the exact Gaussian-mixture denoiser with exact reference states. A bundled digit pipeline: a 250-step
DDIM reference of the same backbone (DC-Solver's protocol), class labels 0-9 repeated over ``--latents`` samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from samplers import CascadePolynomialRegression, DCSolverScheduler, search_dc_ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm", help="'gmm' or a bundled pipeline folder (assets/digits-unet)")
    ap.add_argument("--nfes", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    ap.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    ap.add_argument("--latents", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    searched = {}
    for g in args.guidances:
        for n in args.nfes:
            if args.model == "gmm":
                from pipelines.dc_search import gmm_denoise, gmm_reference
                from pipelines.gmm import GaussianMixture, GMMDenoiser

                model = GMMDenoiser(GaussianMixture.random(3, 2, (2, 4, 4), seed=0))
                x_T = torch.randn(args.latents, 2, 4, 4, generator=torch.Generator().manual_seed(2000),
                                  dtype=torch.float64)
                labels = torch.arange(args.latents) % 3
                sched = DCSolverScheduler()
                ref = gmm_reference(model, sched, x_T, labels, g, n)
                ratios, _ = search_dc_ratios(gmm_denoise(model, labels, g), sched, x_T, n, reference=ref,
                                             iters=args.iters, progress=not args.no_progress)
            else:
                from pipelines import DigitsPipeline
                from pipelines.dc_search import search_dc_ratios as search_pipe

                pipe = DigitsPipeline.from_pretrained(args.model)
                ratios, _ = search_pipe(pipe, list(range(10)), n, g, num_latents=args.latents, iters=args.iters,
                                        progress=not args.no_progress)
            searched[(n, g)] = ratios
            print(f"NFE {n} cfg {g}: {[round(r, 4) for r in ratios]}")
    cpr = CascadePolynomialRegression.fit((n, g, r) for (n, g), r in searched.items())
    out = Path(args.out or ("benchmarks/dc_cpr_gmm.json" if args.model == "gmm" else Path(args.model) / "dc_cpr.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    d = cpr.to_dict()
    d["searched"] = {f"{n}|{g}": r for (n, g), r in searched.items()}
    out.write_text(json.dumps(d, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
