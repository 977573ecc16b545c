"""`make demo`: quantize the bundled digit U-Net and DiT, sample them with fast samplers, evaluate; then a LoRA on a
quantized model, a searched schedule against the default grid, and a Flux replica quantized and sampled.

    python scripts/demo.py                                   # everything (under 10 minutes on 2 cores)
    python scripts/demo.py --models dit --presets w8a8 --samplers deis --nfe 5 --num-samples 50
    python scripts/demo.py --parts lora flux                 # only some parts
    make demo ARGS="--models unet --nfe 10"

Part ``quant``, for each model:

1. A full-precision reference: DPM-Solver++ (diffusers), ``--ref-nfe`` (50) steps.
2. Full precision and each preset (``pipelines.quantize_pipeline``: timestep-aware calibration through the pipeline,
   ``--calib-samples`` images at ``--calib-nfe`` DPM-Solver++ steps, other seeds than the evaluation).
3. For each sampler (dmq's DEIS and DC-Solver, diffusers' DPM-Solver++) and NFE: ``--num-samples`` images, label
   ``i % 10`` and seed ``seed + i``, guidance ``--guidance``.
4. FID against the 360 held-out digits in the bundled classifier's feature space, class accuracy by that
   classifier, and PSNR against the full-precision reference at the same seeds.

Parts ``lora``, ``schedule`` and ``flux`` (scripts/demo_parts.py): a LoRA fine-tuned on the float model
(``pipelines.lora``) loaded onto the ``--lora-preset`` model, its effect there against on the float model,
fuse/unfuse and latency; ``pipelines.search_schedule`` / ``fit_sampler`` at ``--search-nfe`` against the default
grid, both against the quant part's reference; a random-weight Flux replica (``pipelines.flux_replica``) quantized
at ``--flux-presets`` and sampled with DEIS and DC-Solver, SQNR against full precision.

Prints the tables and writes ``OUT/results.json`` (the quant rows under ``results``, the other parts under
``lora``, ``schedule_search`` and ``flux``), ``OUT/grid-<model>.png`` (rows: configurations, columns: the classes
0-9, the first sample of each), ``OUT/error_vs_nfe.png``, ``OUT/grid-lora.png``, ``OUT/grid-schedule.png`` and
``OUT/grid-flux.png``. DC-Solver ratios come from ``docs/demo/dc_ratios.json`` or the model's ``dc_cpr.json``
(``scripts/search_dc.py``); a missing entry is searched at run time (minutes) and cached in ``OUT/dc_ratios.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402
from pipelines import DigitsPipeline, load_digits  # noqa: E402
from pipelines.evaluation import DigitsFeatures, class_accuracy, feature_stats, fid_from_stats, psnr  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from demo_parts import calibrate, draw_grid, flux_part, load_pipeline, lora_part, sample, schedule_part, set_sampler  # noqa: E402

SAMPLER_NAMES = ("deis", "dc-solver", "dpm++")
PARTS = ("quant", "lora", "schedule", "flux")
LABELS = {"deis": "DEIS", "dc-solver": "DC-Solver", "dpm++": "DPM-Solver++"}


NAMED = ["int8", "int6", "int4", "e5m2", "e4m3", "e3m2", "e2m3", "e2m1", "mxfp8", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
         "nvfp4"]


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - q).pow(2).sum()))


def _fake_quant(fmt, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    if fmt.is_block:
        return fmt.quantize(x)
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = amax / fmt.max
    return fmt.quantize(x / scale) * scale


def formats_report() -> None:
    """Storage and SQNR of every named format on a Gaussian weight and a heavy-tailed activation (``--formats``)."""
    from dmq import formats
    from dmq.formats import pack

    torch.manual_seed(0)  # StudentT samples from the global generator
    weight = torch.randn(1024, 1024) * 0.02
    act = torch.distributions.StudentT(3.0).sample((1024, 1024))
    print("dmq number formats: storage and SQNR (higher is better)\n")
    header = f"{'format':<12}{'bits':>5}{'bits/elem':>11}{'max':>10}{'weight SQNR':>13}{'act SQNR':>10}{'KiB/1M':>8}"
    print(header)
    print("-" * len(header))
    for name in NAMED:
        fmt = formats.get(name)
        elem = fmt.element if fmt.is_block else fmt
        bpe = fmt.bits_per_element if fmt.is_block else float(fmt.bits)
        packed = pack(elem.encode(torch.zeros(2**20)), elem.bits).numel()
        w_db, a_db = sqnr_db(weight, _fake_quant(fmt, weight, True)), sqnr_db(act, _fake_quant(fmt, act, False))
        print(f"{name:<12}{fmt.bits:>5}{bpe:>11.2f}{elem.max:>10g}{w_db:>13.1f}{a_db:>10.1f}{packed / 1024:>8.0f}")
    print("\nKiB/1M: packed element codes for one million values (block scales not included).")
    print("Run `make test` for the exactness tests and `python scripts/bench_formats.py` for throughput.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    p.add_argument("--presets", nargs="+", default=["w8a8", "w4a8", "w4a6-fp"],
                   help=f"dmq presets (available: {', '.join(dmq.preset_names())}); 'fp' is always included")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES), choices=SAMPLER_NAMES)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--num-samples", type=int, default=100, help="images per configuration (labels cycle 0-9)")
    p.add_argument("--ref-nfe", type=int, default=50, help="steps of the full-precision DPM-Solver++ reference")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--calib-samples", type=int, default=20)
    p.add_argument("--calib-nfe", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--dc-ratios", default=str(ROOT / "docs" / "demo" / "dc_ratios.json"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="quant: presets x samplers x NFE on --models; lora: a LoRA on a quantized model; schedule: "
                        "a searched schedule against the default; flux: a Flux replica quantized and sampled")
    g = p.add_argument_group("lora part")
    g.add_argument("--lora-model", default="dit", choices=["unet", "dit"])
    g.add_argument("--lora-preset", default="w4a8", help="the W4 preset the LoRA runs on")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-steps", type=int, default=40, help="fine-tuning steps (batch 64) on bold digits")
    g.add_argument("--lora-lr", type=float, default=3e-3)
    g.add_argument("--lora-sampler", default="deis", choices=SAMPLER_NAMES)
    g.add_argument("--lora-nfe", type=int, default=10)
    g.add_argument("--lora-samples", type=int, default=50)
    g.add_argument("--lora-reps", type=int, default=7, help="interleaved latency rounds")
    g = p.add_argument_group("schedule part")
    g.add_argument("--search-model", default="unet", choices=["unet", "dit"])
    g.add_argument("--search-nfe", type=int, default=5)
    g.add_argument("--search-samplers", nargs="+", default=["deis", "dc-solver"], choices=["deis", "dc-solver"],
                   help="deis: search_schedule; dc-solver: fit_sampler (schedule, DC ratios, coefficients)")
    g.add_argument("--search-latents", type=int, default=12, help="search latents (half held out)")
    g = p.add_argument_group("flux part")
    g.add_argument("--flux-presets", nargs="+", default=["w8a8", "w4a8"])
    g.add_argument("--flux-nfe", type=int, default=8)
    g.add_argument("--flux-samples", type=int, default=4, help="prompts (random embeddings), one image each")
    g.add_argument("--flux-calib", type=int, default=4, help="calibration prompts (other seeds)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json to benchmarks/demo.json and the images to docs/demo/ (README)")
    p.add_argument("--formats", action="store_true", help="only print the number-formats report (storage, SQNR)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for preset in [*args.presets, args.lora_preset, *args.flux_presets]:
        if preset != "fp":
            dmq.get_config(preset)  # ValueError naming the presets
    if min(args.nfe) < 2 or args.ref_nfe < 2 or args.search_nfe < 2:
        raise ValueError("--nfe, --ref-nfe and --search-nfe must be >= 2")
    if args.search_latents < 2:
        raise ValueError("--search-latents must be >= 2 (search and held-out latents)")
    for name in ("num_samples", "calib_samples", "calib_nfe", "lora_rank", "lora_steps", "lora_nfe", "lora_samples",
                 "lora_reps", "flux_nfe", "flux_samples", "flux_calib"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


class DCRatios:
    """DC-Solver ratios per (model, NFE, guidance): a precomputed file, the model's scripts/search_dc.py output
    (searched ratios, then the CPR fit inside its range), else a search now (cached in the output folder)."""

    def __init__(self, path: Path, cache: Path, progress: bool):
        self.files = [p for p in (path, cache) if p.is_file()]
        self.cache, self.progress = cache, progress
        self.table: dict[str, list[float]] = {}
        for f in self.files:
            self.table.update(json.loads(f.read_text()).get("ratios", {}))

    def get(self, model: str, pipe: DigitsPipeline, nfe: int, guidance: float) -> tuple[dict, str]:
        key = f"{model}|{nfe}|{float(guidance)}"
        if key in self.table:
            return {"ratios": self.table[key]}, "searched (docs/demo/dc_ratios.json)"
        cpr_file = ROOT / "assets" / f"digits-{model}" / "dc_cpr.json"
        if cpr_file.is_file():
            d = json.loads(cpr_file.read_text())
            searched = d.get("searched", {}).get(f"{nfe}|{float(guidance)}")
            if searched:
                return {"ratios": searched}, f"searched ({cpr_file.relative_to(ROOT)})"
            lo, hi = d["nfe_range"]
            glo, ghi = d["guidance_range"]
            if lo <= nfe <= hi and glo <= guidance <= ghi:
                return {"cpr": str(cpr_file), "guidance_scale": guidance}, f"CPR ({cpr_file.relative_to(ROOT)})"
        from pipelines.dc_search import search_dc_ratios

        logging.getLogger("demo").warning("no DC-Solver ratios for %s: searching them now (minutes)", key)
        ratios, _ = search_dc_ratios(pipe, list(range(10)), nfe, guidance, num_latents=10, iters=10,
                                     progress=self.progress)
        self.table[key] = ratios
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        self.cache.write_text(json.dumps({"ratios": dict(self.table)}, indent=1))
        return {"ratios": ratios}, "searched now"


def plot_error(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    colors = {"deis": "tab:blue", "dc-solver": "tab:green", "dpm++": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and not r["reference"]]
        precisions = list(dict.fromkeys(r["precision"] for r in rows))
        for sampler in colors:
            for k, prec in enumerate(precisions):
                pts = sorted((r["nfe"], r["rmse_vs_ref"]) for r in rows
                             if r["sampler"] == sampler and r["precision"] == prec)
                if pts:
                    ax.plot(*zip(*pts), styles[k % len(styles)], color=colors[sampler], marker="o",
                            label=f"{LABELS[sampler]}, {prec}")
        ax.set_title(f"digits-{model}: error vs the {rows[0]['ref_nfe'] if rows else ''}-step FP reference")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE vs reference (images in [0, 1])")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: list[dict]) -> None:
    head = "| model | precision | sampler | NFE | FID | class acc | PSNR vs FP-ref dB | s |"
    print(head + "\n|" + "---|" * 8)
    for r in results:
        ps = "ref" if r["reference"] else f"{r['psnr_vs_ref']:.1f}"
        print(f"| {r['model']} | {r['precision']} | {LABELS[r['sampler']]} | {r['nfe']} | {r['fid']:.2f} | "
              f"{r['class_accuracy']:.3f} | {ps} | {r['seconds']:.1f} |")


def print_extras(extras: dict) -> None:
    """The newer parts' summaries (the full records are in results.json)."""
    if "lora" in extras:
        r = extras["lora"]
        p = r["preset"]
        print(f"\nLoRA on {p} (digits-{r['model']}, rank {r['rank']}, {r['train_steps']} steps on bold digits, "
              f"{r['train_seconds']:.0f} s; {r['sampler']} {r['nfe']} steps, {r['num_samples']} samples):")
        print(f"  ink (mean pixel): FP {r['ink']['fp']:.3f} -> FP+LoRA {r['ink']['fp+lora']:.3f}; {p} "
              f"{r['ink'][p]:.3f} -> {p}+LoRA {r['ink'][p + '+lora']:.3f} (bold training digits "
              f"{r['ink_data']['bold']:.3f}, plain {r['ink_data']['digits']:.3f})")
        print(f"  LoRA effect on {p} vs on FP: relative error {r['image_effect_rel_error']:.3f} (images), "
              f"{r['eps_effect_rel_error']:.3f} (eps); class accuracy with LoRA: FP "
              f"{r['class_accuracy']['fp+lora']:.2f}, {p} {r['class_accuracy'][p + '+lora']:.2f}")
        for k, f in r["fusion"].items():
            print(f"  {k}: fused vs unfused eps: max {f['fused_vs_unfused_max_rel']:.1e} of the largest, relative "
                  f"{f['fused_vs_unfused_rel']:.1e}; unfuse restores the bits: {f['unfuse_restores_bits']}")
        lat = r["latency"]
        print(f"  backbone latency (batch {lat['batch']}): {p}+LoRA {lat['ms'][p + '+lora']:.1f} ms vs FP+LoRA "
              f"{lat['ms']['fp+lora']:.1f} ms (x{lat['quantized_lora_vs_fp_lora']:.2f}); LoRA overhead FP "
              f"x{lat['lora_overhead_fp']:.2f}, {p} x{lat['lora_overhead_quantized']:.2f}")
    if "schedule_search" in extras:
        r = extras["schedule_search"]
        print(f"\nsearched schedule vs default (digits-{r['model']}, NFE {r['nfe']}, {r['num_samples']} samples; "
              f"error against FP DPM-Solver++ {r['ref_nfe']} steps):")
        for row in r["rows"]:
            s = r["searches"][row["sampler"]]
            note = "" if row["schedule"] == "default" else (
                f" ({s['search_seconds']:.0f} s search"
                + ("" if s["accepted"] else f"; schedule rejected, default grid kept: {s['reason']}") + ")")
            print(f"  {LABELS[row['sampler']]:<10} {row['schedule']:<9} RMSE {row['rmse_vs_ref']:.4f}  "
                  f"PSNR {row['psnr_vs_ref']:.1f} dB{note}")
    if "flux" in extras:
        r = extras["flux"]
        print(f"\nFlux replica (random weights, {r['transformer_parameters'] / 1e3:.0f}k transformer parameters, "
              f"NFE {r['nfe']}): SQNR against full precision, same sampler and seeds")
        for row in r["results"]:
            if row["precision"] != "fp":
                print(f"  {row['precision']:<6} {LABELS[row['sampler']]:<10} latents {row['latent_sqnr_db']:.1f} dB, "
                      f"images {row['image_sqnr_db']:.1f} dB")


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.formats:
        formats_report()
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    features = DigitsFeatures.from_pretrained(ROOT / "assets" / "digits-classifier")
    classifier = features.classifier
    real = feature_stats(features((load_digits("test")[0] + 1) / 2))
    labels = torch.arange(args.num_samples) % 10
    dc = DCRatios(Path(args.dc_ratios), out / "dc_ratios.json", not args.no_progress)
    precisions = ["fp", *[p for p in args.presets if p != "fp"]]
    runs_per_model = 1 + len(precisions) * len(args.samplers) * len(args.nfe)
    quant_models = args.models if "quant" in args.parts else []
    bar = tqdm(total=runs_per_model * len(quant_models), desc="demo", disable=args.no_progress or not quant_models)
    results: list[dict] = []
    dc_sources: dict[str, str] = {}

    def evaluate(model, precision, sampler, nfe, images, ref, seconds, reference=False) -> None:
        results.append({
            "model": model, "precision": precision, "sampler": sampler, "nfe": nfe, "reference": reference,
            "ref_nfe": args.ref_nfe, "fid": fid_from_stats(*feature_stats(features(images)), *real),
            "class_accuracy": class_accuracy(images, labels, classifier),
            "psnr_vs_ref": float(psnr(images, ref)) if not reference else None,
            "rmse_vs_ref": float((images.double() - ref.double()).pow(2).mean().sqrt()),
            "seconds": seconds,
        })

    refs: dict[str, torch.Tensor] = {}
    for model in quant_models:
        pipe = load_pipeline(model)
        base = pipe.scheduler
        t0 = time.perf_counter()
        set_sampler(pipe, base, "dpm++", {})
        ref = refs[model] = sample(pipe, args.num_samples, args.ref_nfe, args.guidance, args.seed)
        evaluate(model, "fp", "dpm++", args.ref_nfe, ref, ref, time.perf_counter() - t0, reference=True)
        grid = [(f"FP, DPM-Solver++ {args.ref_nfe} (reference)", ref[:10])]
        bar.update()
        for precision in precisions:
            calib_s = 0.0
            if precision != "fp":
                pipe = load_pipeline(model)  # a fresh float model: the packed one below releases its float weights
                set_sampler(pipe, base, "dpm++", {})
                calib_s = calibrate(pipe, precision, args.calib_samples, args.calib_nfe, args.guidance)
            for sampler in args.samplers:
                for nfe in args.nfe:
                    options: dict = {}
                    if sampler == "dc-solver":
                        options, dc_sources[f"{model}|{nfe}"] = dc.get(model, pipe, nfe, args.guidance)
                    set_sampler(pipe, base, sampler, options)
                    t0 = time.perf_counter()
                    images = sample(pipe, args.num_samples, nfe, args.guidance, args.seed)
                    evaluate(model, precision, sampler, nfe, images, ref, time.perf_counter() - t0)
                    results[-1]["calibration_seconds"] = calib_s
                    grid.append((f"{precision}, {LABELS[sampler]} {nfe}", images[:10]))
                    bar.update()
        draw_grid(grid, out / f"grid-{model}.png")
    bar.close()
    if results:
        plot_error(results, out / "error_vs_nfe.png")
    extras: dict[str, dict] = {}
    progress = not args.no_progress
    if "lora" in args.parts:
        t0 = time.perf_counter()
        extras["lora"] = lora_part(args, out, classifier, progress) | {"seconds": time.perf_counter() - t0}
    if "schedule" in args.parts:
        t0 = time.perf_counter()
        extras["schedule_search"] = schedule_part(args, out, refs, dc, progress) | {
            "seconds": time.perf_counter() - t0}
    if "flux" in args.parts:
        t0 = time.perf_counter()
        extras["flux"] = flux_part(args, out, progress) | {"seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - start
    report = {
        "command": "python scripts/demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": {k: v for k, v in vars(args).items() if k not in ("out", "dc_ratios")},
        "dc_ratios": dc_sources, "threads": torch.get_num_threads(), "wall_seconds": wall,
        "torch": torch.__version__, "results": results, **extras,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    if results:
        print(f"\nbundled digit models: {args.num_samples} samples per row, guidance {args.guidance:g}; FID against "
              f"the held-out digits (classifier features); PSNR against FP DPM-Solver++ {args.ref_nfe} steps, same "
              "seeds\n")
        print_table(results)
    print_extras(extras)
    if args.publish:
        import shutil

        (ROOT / "benchmarks").mkdir(exist_ok=True)
        shutil.copy(out / "results.json", ROOT / "benchmarks" / "demo.json")
        (ROOT / "docs" / "demo").mkdir(parents=True, exist_ok=True)
        for f in [*out.glob("grid-*.png"), *out.glob("error_vs_nfe.png")]:
            shutil.copy(f, ROOT / "docs" / "demo" / f.name)
        print("copied results.json to benchmarks/demo.json and the images to docs/demo/; "
              "run scripts/render_readme.py for the README table")
    print(f"\n{wall:.0f} s on {torch.get_num_threads()} threads; wrote results.json and "
          f"{', '.join(sorted(f.name for f in out.glob('*.png')))} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
