"""Sampler accuracy against an exact reference: every DEIS variant beside diffusers' multistep schedulers.

GMM problem (``gmm_problem``): a 3-class x 2-component Gaussian mixture on (2, 4, 4) with the exact denoiser
(``pipelines.gmm``), DDPM's linear VP schedule, and 64 samples from one fixed x_T at t = 999. It is sampled
unconditionally and with classifier-free guidance 1, 2, 4 and 8 (one NFE = one guided evaluation; both branches run
as one batch). The error is the RMSE of the final sample against the DOP853 solution of the probability-flow ODE
from the same x_T (``reference_sample``, tolerance 1e-10). Every solver starts from that x_T at t = 999: diffusers'
uniform grids use ``timestep_spacing="trailing"``, and their Karras and uniform-λ grids start at σ_max = ρ(999). Each
diffusers scheduler is run on every grid it supports (uniform, Karras, uniform λ); the best one is reported per
condition and NFE. Per-sample RMSE medians are kept too: a few samples that switch mixture component dominate the
RMSE at moderate NFE.

    python scripts/bench_samplers.py [--out benchmarks/samplers_gmm.json] [--plot benchmarks/samplers_gmm.png]

Writes the JSON (all numbers, the command, versions) and a log-log plot if matplotlib is installed, and prints a
summary table. Add further problems as functions returning the same structure (see ``gmm_problem``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from tqdm import tqdm

from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from samplers import DEISScheduler

NFES = (3, 4, 5, 6, 8, 10, 15, 20)
CONDITIONS = {"uncond": None, "cfg1": 1.0, "cfg2": 2.0, "cfg4": 4.0, "cfg8": 8.0}
VP_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


@dataclass(frozen=True)
class Candidate:
    """A scheduler factory: ``make(nfe)`` returns ``(scheduler, num_inference_steps)``."""

    name: str
    family: str  # "deis" (ours) or "diffusers"
    grid: str
    make: Callable[[int], tuple]
    order: int | None = None  # points used by the polynomial (diffusers' solver_order), for like-for-like rows


# ---------------------------------------------------------------------------------------------------------------------
# candidates


def deis_candidates() -> list[Candidate]:
    """Every DEIS variant of ``samplers.DEISScheduler``, each on its default grid (power 1.5 in t)."""

    def multistep(method: str, order: int) -> Callable[[int], tuple]:
        return lambda nfe: (DEISScheduler.from_config(VP_CONFIG, deis_method=method, deis_order=order), nfe)

    def rk(order: int) -> Callable[[int], tuple]:
        def make(nfe: int) -> tuple:
            steps = (nfe + 1) // 4 if order == 4 else nfe // order  # RK4's last step has 3 stages: 4N - 1 NFE
            return DEISScheduler.from_config(VP_CONFIG, deis_method="rhork", deis_order=order), max(steps, 1)

        return make

    out = [Candidate("DEIS default (tAB-3)", "deis", "time^1.5", lambda n: (DEISScheduler.from_config(VP_CONFIG), n))]
    out += [Candidate(f"DEIS tAB-{r}", "deis", "time^1.5", multistep("tab", r), r + 1) for r in (0, 1, 2)]
    out += [Candidate("DEIS rhoAB-3", "deis", "time^1.5", multistep("rhoab", 3), 4)]
    out += [Candidate("DEIS iPNDM-3", "deis", "time^1.5", multistep("ipndm", 3), 4)]
    out += [Candidate(f"DEIS rhoRK-{p}", "deis", "time^1.5", rk(p)) for p in (2, 3, 4)]
    return out


def diffusers_candidates() -> list[Candidate]:
    """diffusers' schedulers on each grid they support; all start at t = 999 and end at σ = 0 where they can."""
    grids = {
        "uniform": {"timestep_spacing": "trailing"},
        "karras": {"use_karras_sigmas": True},
        "lambda": {"use_exponential_sigmas": True},  # uniform log σ = uniform λ
    }
    specs = [
        ("diffusers DEIS-2", DEISMultistepScheduler, {"solver_order": 2}, 2),
        ("diffusers DEIS-3", DEISMultistepScheduler, {"solver_order": 3}, 3),
        ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {"solver_order": 2}, 2),
        ("DPM-Solver++ 3M", DPMSolverMultistepScheduler, {"solver_order": 3}, 3),
        ("UniPC-2 (bh2)", UniPCMultistepScheduler, {"solver_order": 2}, 2),
        ("Euler", EulerDiscreteScheduler, {}, 1),
        ("DDIM", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, 1),
    ]
    out = []
    for name, cls, kw, order in specs:
        for grid, gkw in grids.items():
            if cls is DDIMScheduler and grid != "uniform":
                continue
            if cls is DPMSolverMultistepScheduler and grid == "lambda":
                gkw = {"use_lu_lambdas": True}
            cfg = {**VP_CONFIG, **kw, **gkw}
            out.append(Candidate(name, "diffusers", grid, lambda nfe, cls=cls, cfg=cfg: (cls(**cfg), nfe), order))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# problems


@torch.no_grad()
def sample(
    scheduler, steps: int, model: torch.nn.Module, x_T: torch.Tensor, labels, guidance, null_label: int | None = None
) -> tuple[torch.Tensor, int]:
    """The standard pipeline loop with classifier-free guidance; returns the final sample and the NFE used."""
    scheduler.set_timesteps(steps)
    if float(scheduler.timesteps[0]) < 998.5:
        raise RuntimeError(f"{type(scheduler).__name__} starts at t={float(scheduler.timesteps[0])}, not 999")
    x = x_T * scheduler.init_noise_sigma
    if null_label is None:
        null_label = model.mixture.null_label
    null = None if labels is None else torch.full_like(labels, null_label)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        tt = torch.as_tensor(t).reshape(1).expand(x.shape[0])  # one timestep per sample: DiT needs a 1-d tensor
        if labels is None or guidance == 1.0:
            out = model(x_in, tt, labels).sample
        else:
            both = model(torch.cat([x_in, x_in]), torch.cat([tt, tt]), torch.cat([labels, null])).sample
            cond, uncond = both.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x, len(scheduler.timesteps)


def gmm_problem(num_samples: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Run every candidate on the GMM problem. Returns ``{"problem": …, "results": {name|grid: {cond: {nfe: …}}}}``."""
    mixture = GaussianMixture.random(3, 2, (2, 4, 4), seed=seed)
    model = GMMDenoiser(mixture)
    x_T = torch.randn(num_samples, 2, 4, 4, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    labels = torch.arange(num_samples) % 3
    refs = {}
    for cond, g in CONDITIONS.items():
        refs[cond] = reference_sample(model, x_T, None if g is None else labels, 1.0 if g is None else g)
    results: dict[str, dict] = {}
    cands = deis_candidates() + diffusers_candidates()
    for cand in tqdm(cands, desc="gmm", disable=not progress):
        key = f"{cand.name}|{cand.grid}"
        results[key] = {"name": cand.name, "family": cand.family, "grid": cand.grid, "order": cand.order, "runs": {}}
        for cond, g in CONDITIONS.items():
            rows = {}
            for nfe in NFES:
                sched, steps = cand.make(nfe)
                x, used = sample(sched, steps, model, x_T, None if g is None else labels, g)
                per = (x - refs[cond]).pow(2).flatten(1).mean(1).sqrt()
                rmse = (x - refs[cond]).pow(2).mean().sqrt().item()
                rows[str(nfe)] = {
                    "nfe_used": used,
                    "rmse": rmse if math.isfinite(rmse) else None,
                    "median_sample_rmse": per.median().item() if bool(torch.isfinite(per).all()) else None,
                    "samples_off_by_0.3": int((per > 0.3).sum()),
                }
            results[key]["runs"][cond] = rows
    problem = {
        "name": "gmm",
        "mixture": "GaussianMixture.random(3, 2, (2, 4, 4), seed=%d)" % seed,
        "schedule": VP_CONFIG,
        "num_samples": num_samples,
        "x_T": f"torch.randn(generator seed {1000 + seed}) at t = 999",
        "conditions": {k: ("unconditional" if v is None else f"labels arange(n) % 3, guidance {v}") for k, v in
                       CONDITIONS.items()},
        "reference": "pipelines.gmm.reference_sample (DOP853, rtol = atol = 1e-10) to σ = 0",
    }
    return {"problem": problem, "results": results}


# ---------------------------------------------------------------------------------------------------------------------
# reporting


def best_of(results: dict, cond: str, nfe: int, pred: Callable[[dict], bool]) -> tuple[float, str]:
    """Lowest RMSE (at exactly ``nfe`` evaluations) among candidates matching ``pred``, with its label."""
    best = (math.inf, "")
    for key, res in results.items():
        row = res["runs"][cond][str(nfe)]
        if pred(res) and row["nfe_used"] == nfe and row["rmse"] is not None and row["rmse"] < best[0]:
            best = (row["rmse"], key)
    return best


def summary(results: dict) -> dict:
    """Per condition and NFE: the DEIS default against the best diffusers combination, and our tAB-r against
    diffusers' DEIS with as many points (our degree r = their ``solver_order`` r + 1), each on its best grid."""
    default = "DEIS default (tAB-3)|time^1.5"

    def row(key: str, cond: str, nfe: int) -> dict:
        return results[key]["runs"][cond][str(nfe)]

    out = {}
    for cond in CONDITIONS:
        rows = {}
        for nfe in NFES:
            ours = row(default, cond, nfe)
            best, best_key = best_of(results, cond, nfe, lambda r: r["family"] == "diffusers")
            entry = {
                "deis_default": ours["rmse"],
                "deis_default_median": ours["median_sample_rmse"],
                "best_diffusers": best,
                "best_diffusers_config": best_key,
                "best_diffusers_median": row(best_key, cond, nfe)["median_sample_rmse"],
                "ratio_default_to_best_diffusers": ours["rmse"] / best,
            }
            for r in (1, 2):
                theirs, their_key = best_of(results, cond, nfe, lambda x, r=r: x["name"] == f"diffusers DEIS-{r + 1}")
                tab = row(f"DEIS tAB-{r}|time^1.5", cond, nfe)["rmse"]
                entry[f"diffusers_deis{r + 1}"] = theirs
                entry[f"diffusers_deis{r + 1}_grid"] = their_key.split("|")[-1]
                entry[f"ours_tab{r}"] = tab
                entry[f"ratio_tab{r}_to_diffusers_deis{r + 1}"] = tab / theirs
            rows[str(nfe)] = entry
        out[cond] = rows
    return out


def print_summary(summ: dict) -> None:
    for cond, rows in summ.items():
        print(f"\n[{cond}] final-sample RMSE vs the exact PF-ODE solution (per-sample median in parentheses)")
        print(f"{'NFE':>3} | {'DEIS default':>20} | {'best diffusers':>20} {'(which)':31} {'ratio':>5} | "
              f"{'dDEIS-3':>8} {'tAB-2':>8} {'ratio':>5} | {'dDEIS-2':>8} {'tAB-1':>8} {'ratio':>5}")
        for nfe, r in rows.items():
            print(f"{nfe:>3} | {r['deis_default']:9.2e} ({r['deis_default_median']:8.2e}) | "
                  f"{r['best_diffusers']:9.2e} ({r['best_diffusers_median']:8.2e}) {r['best_diffusers_config']:31} "
                  f"{r['ratio_default_to_best_diffusers']:5.2f} | {r['diffusers_deis3']:8.2e} {r['ours_tab2']:8.2e} "
                  f"{r['ratio_tab2_to_diffusers_deis3']:5.2f} | {r['diffusers_deis2']:8.2e} {r['ours_tab1']:8.2e} "
                  f"{r['ratio_tab1_to_diffusers_deis2']:5.2f}")


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(5 * len(CONDITIONS), 4.5), sharey=True)
    for ax, cond in zip(axes, CONDITIONS):
        names = {}
        for key, res in results.items():  # best grid per diffusers scheduler, every DEIS variant
            pts = [(row["nfe_used"], row["rmse"]) for row in res["runs"][cond].values() if row["rmse"] is not None]
            names.setdefault(res["name"], []).append((res, pts))
        for name, entries in names.items():
            res, pts = min(entries, key=lambda e: np.mean([math.log(p[1]) for p in e[1]]))
            style = "-" if res["family"] == "deis" else "--"
            width = 2.5 if name.startswith("DEIS default") else 1.0
            ax.loglog(*zip(*pts), style, marker="o", ms=3, lw=width, label=f"{name} [{res['grid']}]")
        ax.set_title(cond)
        ax.set_ylim(1e-3, 3.0)  # some ρRK / iPNDM runs diverge at few steps under guidance: clipped
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMSE vs exact")
    axes[-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


DIGIT_NFES = (5, 10)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _digits_setup(name: str, n: int) -> tuple:
    """A bundled pipeline, its backbone, the classifier and its features, the held-out feature statistics, and
    ``n`` fixed starting noises with labels cycling 0..9."""
    from pipelines import DigitClassifier, DigitsPipeline, load_digits
    from pipelines.evaluation import DigitsFeatures, feature_stats

    pipe = DigitsPipeline.from_pretrained(ASSETS / name)
    pipe.set_progress_bar_config(disable=True)
    if dict(pipe.scheduler.config)["beta_schedule"] != VP_CONFIG["beta_schedule"]:
        raise RuntimeError("the bundled models use DDPM's linear schedule, as VP_CONFIG")
    clf = DigitClassifier.from_pretrained(ASSETS / "digits-classifier").eval()
    feats = DigitsFeatures(clf)
    real = feature_stats(feats((load_digits("test")[0] + 1) / 2))
    x_T = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe, pipe.backbone.eval(), clf, feats, real, x_T, torch.arange(n) % 10


def digits_problem(name: str, num_samples: int = 64, fid_samples: int = 500, guidance: float = 2.0,
                   progress: bool = True) -> dict:
    """A bundled digit model (``assets/<name>``): every candidate at NFE 5 and 10.

    RMSE (pixels in [-1, 1]) of the final sample against DPM-Solver++(2M) with 1000 steps from the same x_T, for
    ``num_samples`` samples; then, for the DEIS default and each diffusers scheduler on its best grid here, class
    accuracy and FID (digit features, against the 360 held-out digits) of ``fid_samples`` samples.
    """
    from pipelines.evaluation import feature_stats, fid_from_stats

    pipe, model, clf, feats, real, x_T, labels = _digits_setup(name, max(num_samples, fid_samples))
    t0 = time.perf_counter()
    ref, _ = sample(DPMSolverMultistepScheduler(**VP_CONFIG, timestep_spacing="trailing"), 1000, model,
                    x_T[:num_samples], labels[:num_samples], guidance, null_label=10)
    ref_seconds = time.perf_counter() - t0
    results: dict[str, dict] = {}
    cands = deis_candidates() + diffusers_candidates()
    for cand in tqdm(cands, desc=name, disable=not progress):
        key = f"{cand.name}|{cand.grid}"
        rows = {}
        for nfe in DIGIT_NFES:
            sched, steps = cand.make(nfe)
            x, used = sample(sched, steps, model, x_T[:num_samples], labels[:num_samples], guidance, null_label=10)
            rmse = (x - ref).pow(2).mean().sqrt().item()
            rows[str(nfe)] = {"nfe_used": used, "rmse": rmse if math.isfinite(rmse) else None}
        results[key] = {"name": cand.name, "family": cand.family, "grid": cand.grid, "order": cand.order,
                        "runs": {f"cfg{guidance:g}": rows}}
    # FID and class accuracy: the DEIS default and every diffusers scheduler on its best grid (by mean log RMSE)
    best: dict[str, str] = {"DEIS default (tAB-3)": "DEIS default (tAB-3)|time^1.5"}
    for key, res in results.items():
        if res["family"] != "diffusers":
            continue
        score = np.mean([math.log(r["rmse"] or 1e9) for r in res["runs"][f"cfg{guidance:g}"].values()])
        prev = best.get(res["name"])
        if prev is None or score < np.mean([math.log(r["rmse"] or 1e9)
                                           for r in results[prev]["runs"][f"cfg{guidance:g}"].values()]):
            best[res["name"]] = key
    by_make = {f"{c.name}|{c.grid}": c for c in cands}
    quality = {}
    for label, key in tqdm(best.items(), desc=f"{name} fid", disable=not progress):
        quality[key] = {}
        for nfe in DIGIT_NFES:
            sched, steps = by_make[key].make(nfe)
            xs = torch.cat([sample(sched, steps, model, x_T[i:i + 250], labels[i:i + 250], guidance, null_label=10)[0]
                            for i in range(0, fid_samples, 250)])
            images = (xs / 2 + 0.5).clamp(0, 1)
            with torch.no_grad():
                acc = (clf(images * 2 - 1).argmax(-1) == labels[:fid_samples]).float().mean().item()
            fid = fid_from_stats(*feature_stats(feats(images)), *real)
            quality[key][str(nfe)] = {"class_accuracy": acc, "fid": fid}
    problem = {
        "name": name, "num_samples": num_samples, "fid_samples": fid_samples, "guidance": guidance,
        "reference": "DPM-Solver++(2M), 1000 steps, trailing spacing, from the same x_T",
        "reference_seconds": round(ref_seconds, 1),
        "fid": "digit-classifier features vs the 360 held-out digits",
    }
    return {"problem": problem, "results": results, "quality": quality}


def dc_digits_problem(name: str, num_samples: int = 32, fid_samples: int = 200, nfes=(5, 10), guidances=(2.0, 4.0),
                      progress: bool = True) -> dict:
    """DC-Solver on a bundled digit model: ratios searched with ``pipelines.search_dc_ratios`` (10 latents of their
    own, 250-step DDIM reference), then, on other latents, RMSE against a 1000-step DPM-Solver++(2M) reference and
    FID / class accuracy, beside plain UniPC (ratios 1), DPM-Solver++(2M) and the DEIS default."""
    from pipelines.dc_search import search_dc_ratios as search_pipe
    from pipelines.evaluation import feature_stats, fid_from_stats
    from samplers import DCSolverScheduler

    pipe, model, clf, feats, real, x_T, labels = _digits_setup(name, max(num_samples, fid_samples))
    out: dict = {"problem": {"name": name, "num_samples": num_samples, "fid_samples": fid_samples,
                             "search": "pipelines.search_dc_ratios, 10 latents (seed 1), 250-step DDIM reference"},
                 "runs": {}}
    for g in guidances:
        ref, _ = sample(DPMSolverMultistepScheduler(**VP_CONFIG, timestep_spacing="trailing"), 1000, model,
                        x_T[:num_samples], labels[:num_samples], g, null_label=10)
        for nfe in nfes:
            t0 = time.perf_counter()
            ratios, losses = search_pipe(pipe, list(range(10)), nfe, g, seed=1, progress=False)
            search_s = time.perf_counter() - t0
            makers = {
                "DC-Solver (searched)": lambda: DCSolverScheduler.from_config(VP_CONFIG, dc_ratios=ratios),
                "UniPC-2 (ratios 1)": lambda: DCSolverScheduler.from_config(VP_CONFIG),
                "DPM-Solver++ 2M": lambda: DPMSolverMultistepScheduler(**VP_CONFIG, timestep_spacing="trailing"),
                "DEIS default": lambda: DEISScheduler.from_config(VP_CONFIG),
            }
            cell = {"ratios": ratios, "search_losses": losses, "search_seconds": round(search_s, 1)}
            for label, make in makers.items():
                x, _ = sample(make(), nfe, model, x_T[:num_samples], labels[:num_samples], g, null_label=10)
                xs = torch.cat([sample(make(), nfe, model, x_T[i:i + 250], labels[i:i + 250], g, null_label=10)[0]
                                for i in range(0, fid_samples, 250)])
                images = (xs / 2 + 0.5).clamp(0, 1)
                with torch.no_grad():
                    acc = (clf(images * 2 - 1).argmax(-1) == labels[:fid_samples]).float().mean().item()
                cell[label] = {"rmse": (x - ref).pow(2).mean().sqrt().item(), "class_accuracy": acc,
                               "fid": fid_from_stats(*feature_stats(feats(images)), *real)}
            out["runs"][f"{nfe}|{g:g}"] = cell
            if progress:
                print(name, nfe, g, {k: round(v["rmse"], 4) for k, v in cell.items() if isinstance(v, dict)},
                      flush=True)
    return out


def print_digits(report: dict) -> None:
    for name, prob in report.items():
        g = prob["problem"]["guidance"]
        print(f"\n[{name}] guidance {g:g}: RMSE vs 1000-step reference | class accuracy | FID (digits)")
        for key, q in prob["quality"].items():
            runs = prob["results"][key]["runs"][f"cfg{g:g}"]
            cells = "  ".join(f"NFE {n}: {runs[n]['rmse']:.4f} | {q[n]['class_accuracy'] * 100:5.1f}% | "
                              f"{q[n]['fid']:6.2f}" for n in q)
            print(f"{key:42} {cells}")


# ---------------------------------------------------------------------------------------------------------------------
# DC-Solver (dynamic compensation) on the GMM problem

DC_NFES = (4, 5, 6, 8, 10)
DC_GUIDANCES = (1.0, 2.0, 4.0, 7.5)


def dc_gmm_problem(num_samples: int = 64, seed: int = 0, search_samples: int = 16, iters: int = 40,
                   progress: bool = True) -> dict:
    """Final-sample RMSE of DC-Solver against the exact reference at ``DC_NFES`` x ``DC_GUIDANCES``.

    Ratios are searched (``samplers.search_dc_ratios``, exact GMM reference states) on ``search_samples`` latents
    drawn with another seed than the evaluated ones. CPR rows: for every interior configuration, a CPR fitted on all
    other configurations (leave one out) predicts its ratios. Peers: our DC scheduler with ratios 1 (plain UniPC),
    diffusers' UniPC-2 (bh2), DPM-Solver++ 2M/3M (best of uniform/Karras grids) and our DEIS default. All use CFG on ε
    with labels ``arange(n) % 3``.
    """
    from pipelines.dc_search import gmm_denoise, gmm_reference
    from samplers import CascadePolynomialRegression, DCSolverScheduler, search_dc_ratios

    mixture = GaussianMixture.random(3, 2, (2, 4, 4), seed=seed)
    model = GMMDenoiser(mixture)
    x_T = torch.randn(num_samples, 2, 4, 4, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    labels = torch.arange(num_samples) % 3
    x_s = torch.randn(search_samples, 2, 4, 4, generator=torch.Generator().manual_seed(2000 + seed),
                      dtype=torch.float64)
    labels_s = torch.arange(search_samples) % 3

    def dc(**kw):
        return DCSolverScheduler.from_config(VP_CONFIG, **kw)

    peers = {
        "UniPC-2 ours (ratios 1)": lambda n: (dc(), n),
        "DEIS default (tAB-3)": lambda n: (DEISScheduler.from_config(VP_CONFIG), n),
    }
    for name, cls, kw in (("diffusers UniPC-2 (bh2)", UniPCMultistepScheduler, {"solver_order": 2}),
                          ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {"solver_order": 2}),
                          ("DPM-Solver++ 3M", DPMSolverMultistepScheduler, {"solver_order": 3})):
        for grid, gkw in (("uniform", {"timestep_spacing": "trailing"}), ("karras", {"use_karras_sigmas": True})):
            peers[f"{name}|{grid}"] = lambda n, cls=cls, cfg={**VP_CONFIG, **kw, **gkw}: (cls(**cfg), n)
    rows: dict[str, dict] = {}
    searched: dict[tuple[int, float], dict[str, list[float]]] = {}
    configs = [(n, g) for g in DC_GUIDANCES for n in DC_NFES]
    for g in tqdm(DC_GUIDANCES, desc="dc gmm", disable=not progress):
        ref = reference_sample(model, x_T, labels, g)

        def err(sched, steps):
            x, _ = sample(sched, steps, model, x_T, labels, g)
            r = (x - ref).pow(2).mean().sqrt().item()
            return r if math.isfinite(r) else None

        for n in DC_NFES:
            cell = rows.setdefault(f"{n}|{g}", {})
            for key, make in peers.items():
                cell[key] = err(*make(n))
            searched[(n, g)] = {}
            for var in ("t", "lambda"):
                s = dc(dc_variable=var)
                refs = gmm_reference(model, s, x_s, labels_s, g, n)
                ratios, _ = search_dc_ratios(gmm_denoise(model, labels_s, g), s, x_s, n, reference=refs, iters=iters,
                                             progress=False)
                searched[(n, g)][var] = ratios
                cell[f"DC searched ({var})"] = err(dc(dc_variable=var, dc_ratios=ratios), n)
    for n, g in configs:
        if n in (DC_NFES[0], DC_NFES[-1]) or g in (DC_GUIDANCES[0], DC_GUIDANCES[-1]):
            continue  # CPR only at interior (held-out) configurations: no extrapolation
        cpr = CascadePolynomialRegression.fit((m, h, searched[(m, h)]["t"]) for m, h in configs if (m, h) != (n, g))
        ref = reference_sample(model, x_T, labels, g)
        x, _ = sample(dc(cpr=cpr.to_dict(), cpr_guidance_scale=g), n, model, x_T, labels, g)
        rows[f"{n}|{g}"]["DC CPR (held out)"] = (x - ref).pow(2).mean().sqrt().item()
    return {
        "problem": {"mixture": f"GaussianMixture.random(3, 2, (2, 4, 4), seed={seed})", "schedule": VP_CONFIG,
                    "num_samples": num_samples, "search_samples": search_samples, "search_seed": 2000 + seed,
                    "iters": iters, "reference": "reference_sample (DOP853, 1e-10)",
                    "dc_grid": "DCSolverScheduler default: uniform t from 999, bh2, order 2, dc_order 2"},
        "ratios": {f"{n}|{g}": v for (n, g), v in searched.items()},
        "rmse": rows,
    }


def print_dc(report: dict) -> None:
    """Per (NFE, guidance): searched DC, CPR, plain UniPC, the best diffusers scheduler and the ratio DC/best."""
    head = ("NFE", "cfg", "DC(t)", "DC(λ)", "CPR", "UniPC", "bestDiff", "DC/best")
    print(" ".join(f"{h:>8}" for h in head) + "  best")
    for key, cell in report["rmse"].items():
        n, g = key.split("|")
        diff = {k: v for k, v in cell.items() if "|" in k and v is not None}
        bk = min(diff, key=diff.get)
        cpr = cell.get("DC CPR (held out)")
        print(f"{n:>8} {g:>8} {cell['DC searched (t)']:8.4f} {cell['DC searched (lambda)']:8.4f} "
              f"{(f'{cpr:8.4f}' if cpr is not None else '       -')} {cell['UniPC-2 ours (ratios 1)']:8.4f} "
              f"{diff[bk]:8.4f} {cell['DC searched (t)'] / diff[bk]:7.2f}  {bk}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/samplers_gmm.json")
    ap.add_argument("--plot", default="benchmarks/samplers_gmm.png")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--problems", nargs="+", default=["gmm", "digits"],
                    choices=["gmm", "digits", "dc", "dc-digits"])
    ap.add_argument("--dc-digits-out", default="benchmarks/samplers_dc_digits.json")
    ap.add_argument("--dc-out", default="benchmarks/samplers_dc.json")
    ap.add_argument("--digits-out", default="benchmarks/samplers_digits.json")
    ap.add_argument("--fid-samples", type=int, default=500)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "dc-digits" in args.problems:
        start = time.perf_counter()
        dcd = {name: dc_digits_problem(name, args.samples, args.fid_samples, progress=not args.no_progress)
               for name in ("digits-unet", "digits-dit")}
        Path(args.dc_digits_out).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - start, 1),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}, "problems": dcd}, indent=1))
        print(f"wrote {args.dc_digits_out}")
    if "digits" in args.problems:
        start = time.perf_counter()
        digits = {name: digits_problem(name, args.samples, args.fid_samples, progress=not args.no_progress)
                  for name in ("digits-unet", "digits-dit")}
        Path(args.digits_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.digits_out).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "nfes": list(DIGIT_NFES),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "seconds": round(time.perf_counter() - start, 1), "problems": digits}, indent=1))
        print_digits(digits)
        print(f"wrote {args.digits_out}")
    if "dc" in args.problems:
        torch.set_num_threads(1)
        start = time.perf_counter()
        dc = dc_gmm_problem(args.samples, args.seed, progress=not args.no_progress)
        dc["command"] = "python " + " ".join(sys.argv)
        dc["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        dc["seconds"] = round(time.perf_counter() - start, 1)
        Path(args.dc_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.dc_out).write_text(json.dumps(dc, indent=1))
        print_dc(dc)
        print(f"wrote {args.dc_out} ({dc['seconds']} s)")
    if "gmm" not in args.problems:
        return
    torch.set_num_threads(1)  # thousands of tiny ops: threads only add overhead
    start = time.perf_counter()
    gmm = gmm_problem(args.samples, args.seed, progress=not args.no_progress)
    gmm["summary"] = summary(gmm["results"])
    report = {
        "command": "python " + " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "nfes": list(NFES),
        "gmm": gmm,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_summary(gmm["summary"])
    plotted = plot(gmm["results"], Path(args.plot))
    print(f"\nwrote {out}" + (f" and {args.plot}" if plotted else " (matplotlib is not installed: no plot)"))
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
