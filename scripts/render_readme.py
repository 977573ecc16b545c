"""Regenerate the benchmark tables in README.md and docs/*.md from the JSON files in benchmarks/.

    python scripts/render_readme.py

Each table sits between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` markers and is rebuilt from
``benchmarks/NAME.json`` (or, for the tables in SOURCES, from the files their loader reads); text outside the
markers is left alone. A table may appear in several pages; every copy is rebuilt.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED = ["int8", "int4", "uint8", "e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "mxfp8", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
         "nvfp4"]


def formats_table(data: dict) -> str:
    rows = {(r["format"], r["dtype"]): r for r in data["rows"]}
    lines = [
        f"`{data['command']}` on {data['cpu']}, {data['threads']} threads, torch {data['torch']}, "
        f"{data['numel']:,} elements, median of {data['rounds']} interleaved rounds. Ratios are throughput "
        "relative to PyTorch's native float8 path in the same run (higher is better).",
        "",
        "| format | input | ms | Gelem/s | vs native E4M3 fake-quant | vs native E4M3 cast only |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dtype in ("float32", "bfloat16"):
        fq = rows[("native e4m3fn fake-quant", dtype)]
        cast = rows[("native e4m3fn cast only", dtype)]
        for name in ["native e4m3fn fake-quant", "native e4m3fn cast only", "native e5m2 fake-quant"] + NAMED:
            r = rows.get((name, dtype))
            if r is None:
                continue
            lines.append(
                f"| {name} | {dtype} | {r['median_s'] * 1e3:.1f} | {r['gelem_per_s']:.2f} | "
                f"{fq['median_s'] / r['median_s']:.2f}x | {cast['median_s'] / r['median_s']:.2f}x |"
            )
    minifloats = [r for r in data["rows"] if r["kind"] == "dmq" and r["dtype"] == "float32"
                  and re.fullmatch(r"e\dm\d", r["format"])]
    ratios = [r["throughput_vs_native_e4m3"] for r in minifloats]
    lines += ["", f"All {len(minifloats)} `eXmY` minifloats (float32 input): {min(ratios):.2f}x to {max(ratios):.2f}x "
              f"(median {statistics.median(ratios):.2f}x) of the native E4M3 fake-quant throughput."]
    return "\n".join(lines)


def digits_table(models: dict) -> str:
    q0 = next(iter(models.values()))[0]
    lines = [
        "Full-precision quality of the bundled models (`scripts/build_digit_assets.py`): class accuracy by the "
        "bundled classifier and FID against the 360 held-out digits in its 64-d feature space, "
        f"{q0['num_samples']:,} samples, {q0['sampler']} at {q0['steps']} steps.",
        "",
        "| model | parameters | guidance | class accuracy | FID (digit features) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (q, log) in models.items():
        for g, r in q["guidance"].items():
            lines.append(f"| {name} | {log['parameters']:,} | {float(g):g} | {r['class_accuracy'] * 100:.1f}% | "
                         f"{r['fid']:.2f} |")
    real = next(iter(models.values()))[0]["reference"]
    lines += ["", f"For scale: the {real['num_train']} training digits score FID {real['fid_train_vs_test']:.2f} "
              f"against the same reference; the classifier reads {real['classifier_accuracy'] * 100:.1f}% of the "
              "held-out digits correctly."]
    return "\n".join(lines)


def load_digits_quality() -> dict | None:
    models = {}
    for name, sub in (("digits-unet", "unet"), ("digits-dit", "transformer")):
        q, log = ROOT / "assets" / name / "quality.json", ROOT / "assets" / name / sub / "train_log.json"
        if q.exists() and log.exists():
            models[name] = (json.loads(q.read_text()), json.loads(log.read_text()))
    return models or None


def samplers_gmm_table(data: dict) -> str:
    summ = data["gmm"]["summary"]
    lines = [
        f"`{data['command']}`: final-sample RMSE against the exact probability-flow ODE solution on a 3-class "
        "Gaussian mixture (64 samples, DDPM linear schedule, from t = 999), for the DEIS default (tAB, degree 3, "
        "t-power-1.5 grid) and the best diffusers scheduler-and-grid combination at each NFE (lower is better; "
        "ratio < 1 means DEIS wins).",
        "",
        "| NFE | uncond: DEIS | uncond: best diffusers | ratio | CFG 8: DEIS | CFG 8: best diffusers | ratio |",
        "|---:|---:|---|---:|---:|---|---:|",
    ]
    def cfg(r: dict) -> str:
        return r["best_diffusers_config"].replace("|", ", ")

    for nfe in summ["uncond"]:
        u, g = summ["uncond"][nfe], summ["cfg8"][nfe]
        lines.append(
            f"| {nfe} | {u['deis_default']:.4f} | {u['best_diffusers']:.4f} ({cfg(u)}) | "
            f"{u['ratio_default_to_best_diffusers']:.2f} | {g['deis_default']:.4f} | {g['best_diffusers']:.4f} "
            f"({cfg(g)}) | {g['ratio_default_to_best_diffusers']:.2f} |")
    return "\n".join(lines)


def samplers_digits_table(data: dict) -> str:
    prob0 = next(iter(data["problems"].values()))["problem"]
    lines = [
        f"`{data['command']}`, bundled models at guidance 2: RMSE (pixels in [-1, 1]) against a 1000-step "
        f"DPM-Solver++(2M) reference from the same noise ({prob0['num_samples']} samples), class accuracy and FID in "
        f"the digit features ({prob0['fid_samples']} samples). Each diffusers scheduler runs on its best grid here.",
        "",
        "| model | sampler | NFE 5 RMSE | NFE 5 acc. | NFE 5 FID | NFE 10 RMSE | NFE 10 acc. | NFE 10 FID |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, prob in data["problems"].items():
        g = f"cfg{prob['problem']['guidance']:g}"
        for key, q in prob["quality"].items():
            runs = prob["results"][key]["runs"][g]
            cells = " | ".join(f"{runs[n]['rmse']:.4f} | {q[n]['class_accuracy'] * 100:.1f}% | {q[n]['fid']:.2f}"
                               for n in ("5", "10"))
            lines.append(f"| {name} | {key.replace('|', ', ')} | {cells} |")
    return "\n".join(lines)


def samplers_dc_table(data: dict) -> str:
    lines = [
        f"`{data['command']}`: final-sample RMSE against the exact solution on the Gaussian-mixture problem (64 "
        "evaluation latents; ratios searched on 16 other latents). DC(t) / DC(λ): searched ratios, interpolating in "
        "t or λ; CPR: ratios predicted by a cascade polynomial regression fitted without that configuration; "
        "UniPC: ratios 1; best diffusers: the best of UniPC-2, DPM-Solver++ 2M and 3M on uniform and Karras grids.",
        "",
        "| NFE | guidance | DC(t) | DC(λ) | CPR | UniPC | best diffusers | DC(t) / best |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, cell in data["rmse"].items():
        n, g = key.split("|")
        diff = {k: v for k, v in cell.items() if "|" in k and v is not None}
        best = min(diff.values())
        cpr = cell.get("DC CPR (held out)")
        lines.append(
            f"| {n} | {g} | {cell['DC searched (t)']:.4f} | {cell['DC searched (lambda)']:.4f} | "
            f"{'-' if cpr is None else f'{cpr:.4f}'} | {cell['UniPC-2 ours (ratios 1)']:.4f} | {best:.4f} | "
            f"{cell['DC searched (t)'] / best:.2f} |")
    return "\n".join(lines)


def samplers_dc_digits_table(data: dict) -> str:
    prob0 = next(iter(data["problems"].values()))["problem"]
    lines = [
        f"`{data['command']}`: DC-Solver on the bundled models, ratios searched with `pipelines.search_dc_ratios` "
        "(10 latents of their own, 250-step DDIM reference); RMSE against a 1000-step DPM-Solver++(2M) reference on "
        f"{prob0['num_samples']} other latents; class accuracy and FID (digit features) on {prob0['fid_samples']} "
        "samples.",
        "",
        "| model | NFE | guidance | DC searched | UniPC (ratios 1) | DPM-Solver++ 2M | DEIS default | DC FID "
        "| UniPC FID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, prob in data["problems"].items():
        for key, c in prob["runs"].items():
            n, g = key.split("|")
            r = {m: v for m, v in c.items() if isinstance(v, dict)}
            dc, uni = r["DC-Solver (searched)"], r["UniPC-2 (ratios 1)"]
            lines.append(
                f"| {name} | {n} | {g} | {dc['rmse']:.4f} | {uni['rmse']:.4f} | {r['DPM-Solver++ 2M']['rmse']:.4f} | "
                f"{r['DEIS default']['rmse']:.4f} | {dc['fid']:.2f} | {uni['fid']:.2f} |")
    return "\n".join(lines)


def quant_table(data: dict) -> str:
    proto = data["protocol"]
    lines = [
        f"`python {data['command']}`: ε SQNR against full precision on inputs from the FP trajectory, final-sample "
        f"PSNR against FP from the same seeds ({proto['n_samples']} samples, DPM-Solver++ {proto['steps']} steps, "
        f"guidance 2), FID (digit features) and class accuracy, calibration time ({proto['calib_samples']} images x "
        f"{proto['calib_steps']} steps). `naive-*`: round-to-nearest, min-max per tensor at the same formats. "
        f"Every row samples the same {proto['n_samples']} seeds, so FID differences between rows come from the "
        "quantization; the absolute FID carries a large small-sample bias (compare rows, not with other tables). "
        "`int8-dynamic-linear` is dmq in torchao's int8-dynamic setting (Linear layers only, per-token dynamic "
        "activations), for a like-for-like comparison.",
        "",
        "| model | method | ε SQNR dB | PSNR vs FP dB | FID | class acc. | calibration s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, methods in data["models"].items():
        for name, r in methods.items():
            if name == "fp":
                lines.append(f"| {model} | full precision | | | {r['fid']:.2f} | {r['class_accuracy'] * 100:.1f}% | |")
            elif "skipped" in r:
                lines.append(f"| {model} | {name} | skipped: {r['skipped']} | | | | |")
            else:
                calib = r.get("calibrate_s")
                lines.append(
                    f"| {model} | {name} | {r['eps_sqnr_db']['all']:.1f} | {r['psnr_vs_fp_db']:.1f} | "
                    f"{r['fid']:.2f} | {r['class_accuracy'] * 100:.1f}% | {'' if calib is None else f'{calib:.1f}'} |")
    return "\n".join(lines)


def runtime_table(data: dict) -> str:
    """Tables of ``benchmarks/runtime.json`` (scripts/bench_runtime.py): one per backbone and depth, latency per
    denoiser call with ratios to BF16 and to compiled BF16 measured in the same interleaved rounds, then the goals
    of issue 16 checked against the numbers (a miss is printed as a miss)."""
    mb = 1 / 2**20
    runs = data.get("runs") or [data]
    lines = ["Runs (each a separate process; ratios only compare rows of the same run):", ""]
    lines += [f"{i + 1}. `{r['command']}`: {r.get('cpu_model', r.get('cpu'))}, {r['threads']} thread(s), torch "
              f"{r['torch']}, {r.get('load', 'load not recorded')}, {r['wall_s'] / 60:.1f} min"
              for i, r in enumerate(runs)]
    lines += ["", "`dit-1152` is DiT-XL/2's shape (16 heads x 72, patch 2, 32x32x4 latents, 256 tokens) with random "
              "weights; batch 2 is one image with classifier-free guidance, batch 32 sixteen. Latency: median over "
              "rounds that call every variant once in turn after a warm-up round (from run 17 on, each timed call "
              "right after one untimed call of the same variant: `--warm-calls 1`, as a sampler's next call finds "
              "the model; earlier runs timed a variant right after another model); `+compile` is `torch.compile` of "
              "that variant (default Inductor), `+cache` keeps a dequantized weight copy (memory trade-off, "
              "`dmq.kernels.cache_weights`), `+pytorch` runs the preset with dmq's fused C loops off "
              "(`dmq.kernels.disable(\"native16\")`: their PyTorch form). Calibration: min-max ranges (the "
              "estimator moves scales, not kernels)."]
    gemm = data.get("gemm_512x1152x4608_s")
    if gemm:
        base = gemm["bf16 F.linear"]
        lines += ["", "One 512 x 1152 x 4608 GEMM (a DiT-XL MLP layer, batch 1 with guidance) on each candidate "
                  "kernel, same interleaved rounds:", "", "| kernel | ms | x BF16 |", "|---|---:|---:|"]
        lines += [f"| {k} | {v * 1e3:.2f} | {v / base:.2f} |" for k, v in gemm.items()]
    groups: dict[tuple, list[dict]] = {}
    for r in data["rows"]:
        groups.setdefault((r["model"], r.get("layers"), r.get("run", 0)), []).append(r)
    goals = []
    for (model, layers, run), rows in groups.items():
        ok = {r["variant"]: r for r in rows if "error" not in r}
        bf, bfc = ok.get("bf16"), ok.get("bf16+compile")
        if bf is None:
            continue
        batches = sorted({int(k[9:-2]) for r in ok.values() for k in r if k.startswith("latency_b")})
        head = ["variant"] + [c for b in batches for c in (f"b{b} ms", "x BF16") + (("x BF16 comp.",) if bfc else ())]
        title = f"**{model}**" + (f" ({layers} blocks)" if layers else "") + f", run {run + 1}"
        lines += ["", title, "", "| " + " | ".join(head) + " | weight MiB | paths |",
                  "|---|" + "---:|" * (len(head) - 1) + "---:|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | did not run: {r['error'][:80]} |" + " |" * len(head))
                continue
            if not any(k.startswith("latency_b") for k in r):
                lines.append(f"| {r['variant']} | did not run here |" + " |" * len(head))
                continue
            cells = [r["variant"]]
            for b in batches:
                k = f"latency_b{b}_s"
                if k not in r or k not in bf:
                    cells += [""] * (3 if bfc else 2)
                    continue
                cells += [f"{r[k] * 1e3:.1f}", f"{r[k] / bf[k]:.2f}"]
                if bfc:
                    cells.append(f"{r[k] / bfc[k]:.2f}" if k in bfc else "")
            cells.append(f"{r['weight_bytes'] * mb:.1f}" if "weight_bytes" in r else "")
            cells.append(", ".join(r.get("exec_paths", [])))
            lines.append("| " + " | ".join(cells) + " |")
        goals += _runtime_goals(model, layers, ok, bf, batches)
    lines += ["", "Goals (issue 16), from these numbers:", ""] + [f"- {g}" for g in goals]
    return "\n".join(lines)


# issue 16's latency goals on DiT-XL/2 (28 blocks): preset -> (max x BF16 at batch 1 with CFG, at batch 16 with CFG)
RUNTIME_GOALS = {"w8a8": (0.75, 0.60), "w4a8": (0.80, 0.65), "w4a16": (1.0, 1.0), "fp8": (1.0, 1.0),
                 "nvfp4": (1.25, 1.25), "mxfp4": (1.25, 1.25), "w4a8-fp": (1.25, 1.25)}
# the peer variants at the same setting as a preset (8-bit activations and weights; 4-bit weights and 8-bit
# activations; 4-bit weight-only); runs before quanto W4A8 was measured compared W4A8 with the W8A8 peers
RUNTIME_PEERS = {"w8a8": ("torchao-int8dyn", "quanto-w8a8"), "w4a8": ("quanto-w4a8",),
                 "w4a16": ("torchao-int4wo", "quanto-w4")}
RUNTIME_PEERS_BEFORE_W4A8 = {"w4a8": ("torchao-int8dyn", "quanto-w8a8")}
# suffixes that keep a preset's goal: the opt-in weight copies, and dmq's peer layout (dmq.VARIANTS)
SAME_GOAL = ("prepack", "sdpa", "uniform")


def _runtime_goals(model: str, layers: int | None, ok: dict, bf: dict, batches: list[int]) -> list[str]:
    out = []
    for b in batches:
        k = f"latency_b{b}_s"
        for preset, r in ok.items():
            if k not in r or k not in bf or preset.startswith(("bf16", "fp32", "torchao", "quanto")):
                continue
            ratio = r[k] / bf[k]
            base, *suffixes = preset.split("+")
            if model == "dit-1152" and base in RUNTIME_GOALS and set(suffixes) <= set(SAME_GOAL):
                goal = RUNTIME_GOALS[base][0 if b <= 2 else 1]
                table = RUNTIME_PEERS if "quanto-w4a8" in ok else {**RUNTIME_PEERS, **RUNTIME_PEERS_BEFORE_W4A8}
                peers = [p for p in table.get(base, ()) if p in ok]
                faster = [p for p in peers if k in ok[p] and r[k] < ok[p][k]]
                slower = [p for p in peers if k in ok[p] and r[k] >= ok[p][k]]
                out.append(f"{model} ({layers} blocks) b{b} {preset}: {ratio:.2f}x BF16 "
                           f"({'meets' if ratio <= goal else 'misses'} <= {goal}x)" +
                           (f"; faster than {', '.join(faster)}" if faster else "") +
                           (f"; NOT faster than {', '.join(slower)}" if slower else ""))
            elif model.startswith("digits") and b >= 16 and "+" not in preset:
                out.append(f"{model} b{b} {preset}: {ratio:.2f}x BF16 ({'meets' if ratio <= 1.5 else 'misses'} "
                           "<= 1.5x)")
            elif model.startswith("digits") and b >= 16 and preset.endswith("+compile") and preset != "bf16+compile":
                bfc, eager = ok.get("bf16+compile", {}), ok.get(preset.removesuffix("+compile"), {})
                out.append(f"{model} b{b} {preset}: {ratio:.2f}x BF16" +
                           (f", {r[k] / bfc[k]:.2f}x compiled BF16" if k in bfc else "") +
                           (f" (eager: {eager[k] / bf[k]:.2f}x BF16)" if k in eager else ""))
    return out


def _baseline(name: str) -> str:
    return name.split("+", 1)[0]


def quant_methods_table(data: dict) -> str:
    """Advanced PTQ rows beside their round-to-nearest baseline (the preset before the ``+``)."""
    proto = data["protocol"]
    lines = [
        f"`python {data['command']}` ({data['threads']} thread, {data['machine']}): each method beside "
        "round-to-nearest (RTN) at the same formats, the preset before the `+`. ε SQNR against full precision on "
        f"inputs from the FP trajectory; final-sample PSNR against FP from the same seeds ({proto['n_samples']} "
        f"samples, DPM-Solver++ {proto['steps']} steps, guidance 2); FID (digit features) and ΔFID against full "
        "precision; class accuracy; calibration time including every pass and the reconstruction "
        f"({proto['calib_samples']} images x {proto['calib_steps']} steps, 1 thread); the reconstruction caches' "
        "peak (layer inputs, plus BRECQ's block inputs) and the extra passes over the calibration loop. With "
        "this few samples FID moves by a few percent between runs: ε SQNR "
        "and PSNR are the sharper measures." + "".join(
            f" Rows added by `python {c}`." for c in data.get("appended_commands", [])),
        "",
        "| model | method | ε SQNR dB | Δ vs RTN dB | PSNR vs FP dB | Δ vs RTN dB | FID | ΔFID vs FP | class acc. "
        "| calibration s | cache MB (passes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, rows in data["models"].items():
        fid0 = rows["fp"]["fid"]
        lines.append(f"| {model} | full precision | | | | | {fid0:.2f} | | {rows['fp']['class_accuracy'] * 100:.1f}% "
                     "| | |")
        for name, r in rows.items():
            if name == "fp" or "skipped" in r:
                continue
            base = rows.get(_baseline(name)) if "+" in name else None
            eps, ps = r["eps_sqnr_db"]["all"], r["psnr_vs_fp_db"]
            d_eps = f"{eps - base['eps_sqnr_db']['all']:+.1f}" if base else ""
            d_ps = f"{ps - base['psnr_vs_fp_db']:+.1f}" if base else ""
            m = r.get("methods", {})
            cache = ""
            if "cache_peak_bytes" in m:
                mb = (m["cache_peak_bytes"] + m.get("block_cache_bytes", 0)) / 2 ** 20
                cache = f"{mb:.1f} ({m['cache_passes']})"
            label = name if base else f"{name} (RTN)"
            if "avg_bits" in r:
                label += f", {r['avg_bits']:.2f} bits/weight"
            if r.get("lowrank_params_fraction"):
                label += f" (16-bit branch = {100 * r['lowrank_params_fraction']:.0f}% of the weights)"
            lines.append(
                f"| {model} | {label} | {eps:.1f} | {d_eps} | {ps:.1f} | {d_ps} | {r['fid']:.2f} | "
                f"{100 * (r['fid'] / fid0 - 1):+.1f}% | {r['class_accuracy'] * 100:.1f}% | {r['calibrate_s']:.1f} | "
                f"{cache} |")
    return "\n".join(lines)


def samplers_deis_grids_table(data: dict) -> str:
    nfes = [str(n) for n in data["nfes"]]
    models = list(data["models"])
    proto = data["protocol"]
    lines = [
        f"`{data['command']}`: final-sample RMSE at guidance 2 against DPM-Solver++(2M) with "
        f"{proto['reference_steps']} steps from the same noise ({proto['samples']} samples), per model and "
        "NFE; the best entry of each column in bold.",
        "",
        "| sampler | grid | " + " | ".join(f"{m.removeprefix('digits-')} {n}" for m in models for n in nfes) + " |",
        "|---|---|" + "---:|" * (len(models) * len(nfes)),
    ]
    best = {(m, n): min(v[n] for v in data["models"][m].values() if v[n] is not None) for m in models for n in nfes}
    for key in data["models"][models[0]]:
        name, grid = key.split("|")
        cells = []
        for m in models:
            for n in nfes:
                v = data["models"][m][key][n]
                cells.append("diverged" if v is None else (f"**{v:.4f}**" if v == best[(m, n)] else f"{v:.4f}"))
        lines.append(f"| {name} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_table(data: dict) -> str:
    """``make demo`` (scripts/demo.py --publish): one row per model, precision and sampler; NFE side by side."""
    rows = data["results"]
    nfes = sorted({r["nfe"] for r in rows if not r["reference"]})
    names = {"deis": "DEIS", "dc-solver": "DC-Solver", "dpm++": "DPM-Solver++"}
    proto = data["protocol"]
    lines = [
        f"`{data['command']}`: {data['threads']} thread(s), {data['wall_seconds'] / 60:.1f} min, "
        f"torch {data['torch']}. "
        f"{proto['num_samples']} samples per configuration (label i % 10, seed i), guidance {proto['guidance']:g}. "
        "FID against the 360 held-out digits in the bundled classifier's feature space (lower is better; with "
        f"{proto['num_samples']} samples it carries a bias, so compare rows, not with other tables), class accuracy, "
        f"and PSNR against the full-precision DPM-Solver++ {proto['ref_nfe']}-step samples from the same noise.",
        "",
        "| model | precision | sampler | " + " | ".join(f"FID @{n}" for n in nfes) + " | "
        + " | ".join(f"acc @{n}" for n in nfes) + " | " + " | ".join(f"PSNR dB @{n}" for n in nfes) + " |",
        "|---|---|---|" + "---:|" * (3 * len(nfes)),
    ]
    for r in rows:
        if r["reference"]:
            lines.append(f"| {r['model']} | fp | {names[r['sampler']]} {r['nfe']} steps (reference) | "
                         f"{r['fid']:.2f} |" + " |" * (len(nfes) - 1) + f" {r['class_accuracy'] * 100:.1f}% |"
                         + " |" * (len(nfes) - 1) + " ref |" + " |" * (len(nfes) - 1))
    keys = list(dict.fromkeys((r["model"], r["precision"], r["sampler"]) for r in rows if not r["reference"]))
    for model, prec, sampler in keys:
        cell = {r["nfe"]: r for r in rows if (r["model"], r["precision"], r["sampler"]) == (model, prec, sampler)
                and not r["reference"]}
        fid = " | ".join(f"{cell[n]['fid']:.2f}" if n in cell else "" for n in nfes)
        acc = " | ".join(f"{cell[n]['class_accuracy'] * 100:.1f}%" if n in cell else "" for n in nfes)
        ps = " | ".join(f"{cell[n]['psnr_vs_ref']:.1f}" if n in cell else "" for n in nfes)
        lines.append(f"| {model} | {prec} | {names[sampler]} | {fid} | {acc} | {ps} |")
    return "\n".join(lines + demo_parts_tables(data))


def demo_parts_tables(data: dict) -> list[str]:
    """The demo's newer parts (LoRA on a quantized model, searched schedule, Flux replica), where present."""
    names = {"deis": "DEIS", "dc-solver": "DC-Solver", "dpm++": "DPM-Solver++"}
    lines: list[str] = []

    def ran(part: dict) -> str:  # a part run on its own (not in the command above) names its command
        if "command" not in part:
            return ""
        cpu = f", {part['cpu_seconds'] / 60:.1f} min of CPU time" if "cpu_seconds" in part else ""
        return f" (`{part['command']}`{cpu})"
    if "lora" in data:
        r = data["lora"]
        p, lat = r["preset"], r["latency"]
        fq, ff = r["fusion"][p], r["fusion"]["fp"]
        lines += ["", f"**LoRA on a quantized model**{ran(r)}. A rank-{r['rank']} LoRA fine-tuned for "
                  f"{r['train_steps']} steps (batch {r['batch_size']}, {r['train_seconds']:.0f} s) on the float "
                  f"digits-{r['model']} "
                  f"towards bold digits, then loaded onto the {p} model; {names[r['sampler']]} {r['nfe']} steps, "
                  f"{r['num_samples']} samples, same seeds. Ink: mean pixel value (bold training digits "
                  f"{r['ink_data']['bold']:.3f}, plain {r['ink_data']['digits']:.3f}).", "",
                  "| model | ink | class acc | backbone ms (batch %d) |" % lat["batch"], "|---|---:|---:|---:|"]
        for k in ("fp", "fp+lora", p, f"{p}+lora"):
            lines.append(f"| {k.replace('fp', 'FP').replace('+lora', ' + LoRA')} | {r['ink'][k]:.3f} | "
                         f"{r['class_accuracy'][k] * 100:.0f}% | {lat['ms'][k]:.1f} |")
        lines += ["", f"The LoRA's effect on {p} against its effect on FP (same seeds): relative error "
                  f"{r['image_effect_rel_error']:.3f} on the images (cosine {r['image_effect_cosine']:.3f}) and "
                  f"{r['eps_effect_rel_error']:.3f} on the ε prediction (cosine {r['eps_effect_cosine']:.3f}); "
                  f"the quantization error itself is {r['quantization_rel_error_eps']:.3f} of ε. Fused into "
                  f"{r['lora_layers']} layers, ε moves from the unfused model's by {fq['fused_vs_unfused_rel']:.1e} "
                  f"(relative; FP: {ff['fused_vs_unfused_rel']:.1e}), the fused {p} images are "
                  f"{fq['fused_images_psnr_vs_unfused']:.1f} dB from the unfused ones; unfusing restores the "
                  f"{p} model bit for bit: {'yes' if fq['unfuse_restores_bits'] else 'no'} (FP: "
                  f"{'yes' if ff['unfuse_restores_bits'] else 'no'}). "
                  f"{p} + LoRA runs at {lat['quantized_lora_vs_fp_lora']:.2f}x the time of FP + LoRA; the LoRA "
                  f"costs x{lat['lora_overhead_fp']:.2f} on FP and x{lat['lora_overhead_quantized']:.2f} on {p}."]
    if "schedule_search" in data:
        r = data["schedule_search"]
        lines += ["", f"**Searched schedule against the default grid**{ran(r)}. digits-{r['model']}, NFE {r['nfe']}, "
                  f"guidance {r['guidance']:g}, {r['num_samples']} samples (seeds of the table above), error against "
                  f"the full-precision DPM-Solver++ {r['ref_nfe']}-step samples; the search used "
                  f"{r['search_latents']} other latents (half held out).", "",
                  "| sampler | schedule | timesteps | RMSE | PSNR dB | search s |", "|---|---|---|---:|---:|---:|"]
        for row in r["rows"]:
            s = r["searches"][row["sampler"]]
            searched = row["schedule"] == "searched"
            ts = s["timesteps"] if searched else s["default_timesteps"]
            note = "" if not searched or s["accepted"] else " (schedule rejected: default grid kept)"
            secs = f"{s['search_seconds']:.0f}" if searched else ""
            lines.append(f"| {names[row['sampler']]} | {row['schedule']}{note} | {', '.join(f'{t:.0f}' for t in ts)} "
                         f"| {row['rmse_vs_ref']:.4f} | {row['psnr_vs_ref']:.1f} | {secs} |")
    if "flux" in data:
        r = data["flux"]
        c = r["config"]
        lines += ["", f"**A Flux replica, quantized and sampled**{ran(r)}. diffusers' `FluxPipeline` with random "
                  f"weights (`pipelines.flux_replica`: {c['layers']} double-stream + {c['single_layers']} "
                  "single-stream "
                  f"blocks, width {c['heads'] * c['head_dim']}, {r['transformer_parameters'] / 1e3:.0f}k parameters, "
                  f"{c['image_size']}x{c['image_size']} images), calibrated on {r['calibration_prompts']} random "
                  f"prompt embeddings, {r['num_samples']} others evaluated at NFE {r['nfe']}. SQNR against the "
                  "full-precision pipeline with the same sampler and seeds. Random weights: this tests the "
                  "integration, not image quality.", "",
                  "| preset | sampler | final-latent SQNR dB | image SQNR dB | calibration s |",
                  "|---|---|---:|---:|---:|"]
        for row in r["results"]:
            if row["precision"] != "fp":
                lines.append(f"| {row['precision']} | {names[row['sampler']]} | {row['latent_sqnr_db']:.1f} | "
                             f"{row['image_sqnr_db']:.1f} | {row['calibration_seconds']:.1f} |")
    return lines


def quant_keep_fp_table(data: dict) -> str:
    lines = [
        f"`{data['command']}` (BF16 backbones; machine shared): ε SQNR against the BF16 model and whole-backbone size "
        "(every parameter and buffer, packed) against BF16, for the preset as it was (`legacy`: the 16-bit list of "
        "earlier releases, round-to-nearest) and the new structure-derived default; then the change of ε SQNR (dB) "
        "when one thing about the default changes. "
        "Final-sample PSNR (bundled models, 8 samples, same seeds) in brackets.",
        "",
        "| model | preset | legacy: SQNR [PSNR], size | default: SQNR [PSNR], size | calibration s (CPU s) |",
        "|---|---|---|---|---:|",
    ]
    variants: list[str] = []
    for model, m in data["models"].items():
        for preset, rows in m["presets"].items():
            leg, dft = rows["legacy"], rows["default"]

            def cell(r):
                ps = f" [{r['sample_psnr_db']:.1f}]" if "sample_psnr_db" in r else ""
                return f"{r['sqnr_db']:.1f} dB{ps}, {r['bytes_vs_bf16']:.3f}×"
            cpu = f" ({dft['calibrate_cpu_s']:.1f})" if "calibrate_cpu_s" in dft else ""
            lines.append(f"| {model} | {preset} | {cell(leg)} | {cell(dft)} | {dft['calibrate_s']:.1f}{cpu} |")
            variants += [v for v in rows if v not in ("legacy", "default") and v not in variants]
    lines += ["", "| model | preset | " + " | ".join(variants) + " |", "|---|---|" + "---:|" * len(variants)]
    for model, m in data["models"].items():
        for preset, rows in m["presets"].items():
            base = rows["default"]["sqnr_db"]
            lines.append(f"| {model} | {preset} | " + " | ".join(
                f"{rows[v]['sqnr_db'] - base:+.2f} ({rows[v]['bytes_vs_bf16']:.2f}×)" if v in rows else "–"
                for v in variants) + " |")
    roles = list(next(iter(data["models"].values()))["group_share"])
    lines += ["", "Share of the parameters by structural role (`dmq.structure.classify`):", "",
              "| model | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
    for model, m in data["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{m['group_share'][r] * 100:.2g}%" for r in roles) + " |")
    return "\n".join(lines)


def quant_tables_table(data: dict) -> str:
    """Embedding tables (``benchmarks/quant_tables.json``, ``scripts/bench_keep_fp.py``): the default (INT8 tables)
    and each table variant, ε SQNR [final-sample PSNR] and whole-backbone size against BF16."""
    variants: list[str] = []
    for m in data["models"].values():
        for rows in m["presets"].values():
            variants += [v for v in rows if v != "default" and v not in variants]
    lines = [
        f"`{data['command']}` (BF16 backbones; machine shared): ε SQNR against the BF16 model [final-sample PSNR, "
        "bundled models, 8 samples, same seeds] and whole-backbone size against BF16, for the default (INT8 "
        "group-wise tables under 8-bit weights, 16-bit tables with 8-bit weights; the bundled U-Net keeps its table "
        "with its embedders) and with the tables in 16 bits, in INT8 or at the preset's own weight format "
        "(group-wise); the variants as the change from the default. `dit-xl`: one DiT-XL/2 block at full width, "
        f"random weights. {data.get('note', '')}",
        "",
        "| model | preset | default: SQNR [PSNR], size | " + " | ".join(variants) + " |",
        "|---|---|---|" + "---:|" * len(variants),
    ]
    for model, m in data["models"].items():
        for preset, rows in m["presets"].items():
            d = rows["default"]

            def psnr(r, delta=False):
                if "sample_psnr_db" not in r:
                    return ""
                v = r["sample_psnr_db"] - d["sample_psnr_db"] if delta else r["sample_psnr_db"]
                return f" [{v:+.2f}]" if delta else f" [{v:.1f}]"
            cells = [f"{rows[v]['sqnr_db'] - d['sqnr_db']:+.2f}{psnr(rows[v], True)}, {rows[v]['bytes_vs_bf16']:.3f}×"
                     if v in rows else "–" for v in variants]
            lines.append(f"| {model} | {preset} | {d['sqnr_db']:.1f} dB{psnr(d)}, {d['bytes_vs_bf16']:.3f}× | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_table(data: dict) -> str:
    lines = [
        f"`{data['command']}` ({data['machine']}; random BF16 weights; size-only rows: round-to-nearest, one "
        "calibration call, no accuracy). Sizes are the whole backbone against BF16; peak RSS is the high-water mark "
        "while quantizing, minus the interpreter and libraries (measured apart, after every import), against the "
        "BF16 model's bytes, overall and in each of quantize / calibrate / freeze. Kernel state: what the frozen "
        "layers hold beside their parameters and buffers (`dmq.kernels.kernel_bytes`; no weight copy by default), "
        "against BF16 (– : a row measured before it was recorded).",
        "",
        "| model | preset | params | resident | kernel state | checkpoint | quantize s | calibrate s | freeze s "
        "| peak RSS | q / c / f | ε SQNR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in data["cases"]:
        if "error" in c:
            lines.append(f"| {c['model']} | {c['preset']} | failed | | | | | | | | | |")
            continue
        sq = "size only" if c["size_only"] else f"{c['eps_sqnr_db']:.1f} dB"
        stages = " / ".join(f"{v:.2f}" for v in c.get("stage_peak_rss_vs_bf16", {}).values()) or "–"
        kern = f"{c['kernel_bytes'] / c['bf16_bytes']:.4f}×" if "kernel_bytes" in c else "–"
        lines.append(f"| {c['model']} | {c['preset']} | {c['params'] / 1e6:.0f}M | {c['resident_vs_bf16']:.3f}× | "
                     f"{kern} | {c['checkpoint_vs_bf16']:.3f}× | {c['quantize_s']:.0f} | {c['calibrate_s']:.0f} | "
                     f"{c['freeze_s']:.0f} | {c['peak_rss_vs_bf16']:.2f}× | {stages} | {sq} |")
    ext = [c for c in data["cases"] if "full_resident_vs_bf16" in c]
    if ext:
        lines += ["", "Built with fewer blocks (full width), extrapolated from the measured per-block bytes to the "
                  "full depth:", "", "| model | preset | blocks built → full | per block | whole model | checkpoint | "
                  "BF16 size |", "|---|---|---|---|---:|---:|---:|"]
        for c in ext:
            blocks = ", ".join(f"{c['built_blocks'][k]} → {c['full_blocks'][k]}" for k in c["full_blocks"])
            per = ", ".join(f"{v:.3f}×" for v in c["block_vs_bf16"].values())
            lines.append(f"| {c['model']} | {c['preset']} | {blocks} | {per} | {c['full_resident_vs_bf16']:.3f}× | "
                         f"{c['full_checkpoint_vs_bf16']:.3f}× | {c['full_bf16_bytes'] / 1e9:.2f} GB |")
    return "\n".join(lines)


def families_table(data: dict) -> str:
    """One row per family and denoiser of ``benchmarks/families.json`` (``scripts/bench_families.py``)."""
    lines = [
        f"`{data['command']}` (diffusers {data['diffusers']}, {data['steps']} steps, {data['machine']}): ε SQNR of "
        "each denoiser on the tiny random-weight replica against full precision, on the inputs of a full-precision "
        "sampling run; the Linear/Conv2d layers left in full precision (block indices folded to `*`); attention "
        "matmuls quantized (modules, processor).",
        "",
        "| family | denoiser | W8A8 ε SQNR | W4A8 ε SQNR | quantized layers | full precision | attention "
        "| bins over |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for row in data["families"]:
        for name, d in row["denoisers"].items():
            fp = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in d["full_precision_layers"]})
            fp_text = ", ".join(f"`{n}`" for n in fp[:6]) + (f" (+{len(fp) - 6} more)" if len(fp) > 6 else "")
            attn = (f"yes ({d['attention_modules']}, {', '.join(d['attention_processors'])})"
                    if d["attention_modules"] else "no")
            lo, hi = d["timestep_range"]
            lines.append(f"| {row['family']} ({row['pipeline']}) | `{name}` {d['class']} | "
                         f"{d['w8a8_eps_sqnr_db']:.1f} dB | {d['w4a8_eps_sqnr_db']:.1f} dB | "
                         f"{d['quantized_layers']} | "
                         f"{fp_text or '—'} | {attn} | [{lo:g}, {hi:g}] |")
    return "\n".join(lines)


HEADLINE_PRESETS = ("w8a8", "w4a8", "w4a16", "fp8", "w4a8-fp", "nvfp4")


def load_headline() -> dict | None:
    paths = {k: ROOT / "benchmarks" / f"{k}.json" for k in ("quant", "runtime", "scale")}
    if not all(p.exists() for p in paths.values()):
        return None
    return {k: json.loads(p.read_text()) for k, p in paths.items()}


def _headline_latency(runtime: dict, model: str = "dit-1152") -> dict[str, tuple[float, int]]:
    """Per preset: latency / BF16 at batch 1 with guidance (2 samples), from the newest run that timed both, with the
    run's depth in blocks; deeper runs win over newer shallow ones."""
    best: dict[str, tuple[int, int, float]] = {}
    for r in runtime["rows"]:
        if r["model"] != model or "latency_b2_s" not in r or "error" in r:
            continue
        run = r.get("run", 0)
        bf = next((b for b in runtime["rows"] if b["model"] == model and b.get("run", 0) == run
                   and b["variant"] == "bf16" and "latency_b2_s" in b), None)
        if bf is None:
            continue
        key = (r.get("layers") or 0, run)
        if r["variant"] not in best or key > best[r["variant"]][:2]:
            best[r["variant"]] = (*key, r["latency_b2_s"] / bf["latency_b2_s"])
    return {v: (ratio, layers) for v, (layers, _, ratio) in best.items()}


def headline_table(data: dict) -> str:
    """The README's one table: per preset, accuracy on both bundled models (``benchmarks/quant.json``), the whole
    DiT-XL/2 backbone's resident size (``benchmarks/scale.json``) and its latency (``benchmarks/runtime.json``)
    against BF16."""
    quant = data["quant"]["models"]
    sizes = {c["preset"]: c["full_resident_vs_bf16"] for c in data["scale"]["cases"]
             if c["model"] == "dit-xl-2" and c.get("full_resident_vs_bf16") is not None}
    lat = _headline_latency(data["runtime"])

    def pair(preset: str, fmt) -> str:
        vals = [quant[m].get(preset) for m in ("unet", "dit")]
        return " / ".join("" if v is None or "skipped" in v else fmt(v, quant[m]["fp"])
                          for v, m in zip(vals, ("unet", "dit")))

    def latency(preset: str) -> str:
        if preset not in lat:
            return ""
        ratio, layers = lat[preset]
        return f"{ratio:.2f}" + ("" if layers == 28 else f" ({layers} blocks)")

    lines = [
        f"Bundled digit U-Net / DiT, from [the quantization benchmark](docs/benchmarks.md#quantization-presets-and-"
        f"peers) (`python {data['quant']['command']}`): ε SQNR of the backbone's output against full precision on "
        "the full-precision trajectory, and the same format with naive round-to-nearest (min-max per tensor); FID "
        "change against full precision on the same seeds (digit features), class accuracy. DiT-XL/2 at full width "
        "with random weights: the whole backbone's resident bytes (every parameter and buffer) against BF16, from "
        "[memory](docs/memory.md) (`scripts/bench_scale.py`), and the latency of one denoiser call at batch 1 with "
        "guidance against BF16 in the same run on this CPU, all 28 blocks unless marked, from "
        "[runtime](docs/runtime.md) (`scripts/bench_runtime.py`). W8A8 and W4A8 run the default path, with no "
        "second copy of the weights (`dmq.kernels.prepack_weights(model)` keeps oneDNN's, faster in the same run "
        "and +0.30 / +0.42x BF16 of memory: docs/runtime.md, docs/memory.md). On this machine BF16 GEMMs ran slower "
        "than FP32 ones, in the same runs (docs/runtime.md).",
        "",
        "| preset | ε SQNR dB | naive rounding dB | ΔFID vs FP | class acc. | DiT-XL/2 size x BF16 | latency x BF16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in HEADLINE_PRESETS:
        cells = [
            p,
            pair(p, lambda v, fp: f"{v['eps_sqnr_db']['all']:.1f}"),
            pair(f"naive-{p}", lambda v, fp: f"{v['eps_sqnr_db']['all']:.1f}"),
            pair(p, lambda v, fp: f"{(v['fid'] / fp['fid'] - 1) * 100:+.1f}%"),
            pair(p, lambda v, fp: f"{v['class_accuracy'] * 100:.0f}%"),
            "" if p not in sizes else f"{sizes[p]:.2f}",
            latency(p),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samplers_fit_table(data: dict) -> str:
    """Searched schedules (issue 17): best dmq option / best diffusers scheduler-and-grid, per cell, misses marked."""
    def mark(r: float) -> str:
        return f"{r:.2f}" + ("" if r <= 0.7 else " ✗")

    lines = [f"`{data['command']}` ({data['machine']}). Ratio = RMSE of the best dmq option (searched schedule with "
             "DEIS, UniPC or DC-Solver; DEIS and UniPC also with their coefficients fitted on that schedule or on "
             "one of six fixed grids) / RMSE of the best of 19 diffusers scheduler-and-grid pairs, on latents no "
             "search or fit saw; goal ≤ 0.70, ✗ marks a miss."]

    def cell_text(c: dict) -> str:
        return mark(c["ratio"]) + (f" ({c['eval32']['ratio']:.2f})" if "eval32" in c else "")

    def halved(cells: list, fitted: bool) -> int:
        keys = ("DEIS + fitted", "UniPC + fitted") if fitted else ("DEIS", "UniPC")
        return sum(min(c["searched_vs_default"][k] for k in keys) <= 0.5 for c in cells)
    if "gmm" in data:
        cells = data["gmm"]["cells"]
        nfes = sorted({c["nfe"] for c in cells})
        g = data["gmm"]
        commits = {}  # a rerun of some NFEs keeps the other cells, each with the commit that measured it
        for c in cells:
            commits.setdefault(c.get("commit", g.get("commit")), set()).add(c["nfe"])
        at = ("at commit " + next(iter(commits)) if len(commits) == 1 else "NFE " + "; NFE ".join(
            f"{', '.join(str(n) for n in sorted(v))} at commit {k}" for k, v in commits.items()))
        run = f"; `{g['command']}` {at}, {g['machine']}" if "command" in g else ""
        many = data["gmm"].get("eval_latents")
        lines += ["", f"Gaussian mixtures (exact PF-ODE reference{run}"
                  + (f"; ratio on {many} evaluation latents, in brackets on the first 32 of them" if many else "")
                  + "):", "",
                  "| mixture | guidance | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|---:|" + "---:|" * len(nfes)]
        for mix in dict.fromkeys(c["mixture"] for c in cells):
            for g in dict.fromkeys(c["guidance"] for c in cells if c["mixture"] == mix):
                row = {c["nfe"]: c for c in cells if c["mixture"] == mix and c["guidance"] == g}
                lines.append(f"| {mix.replace('GaussianMixture.random', '')} | {g:g} | "
                             + " | ".join(cell_text(row[n]) if n in row else "–" for n in nfes) + " |")
        met = sum(c["ratio"] <= 0.7 for c in cells)
        if "eval_latents" in data["gmm"]:
            sure = sum(c["ratio_interval"][1] <= 0.7 for c in cells)
            lines += ["", f"On {data['gmm']['eval_latents']} evaluation latents the goal is met in {met} of "
                      f"{len(cells)} cells, and in {sure} the upper end of the ratio's 90% bootstrap interval is "
                      f"below 0.70 too. On the first 32 alone (the evaluation latents of the runs before) it is met "
                      f"in {sum(c['eval32']['ratio'] <= 0.7 for c in cells)}; where those 32 hold a latent that "
                      "changes component, that one latent sets the ratio."]
        five = [c for c in cells if c["nfe"] == 5]
        wins = {k: sum(c["best_dmq"] == k for c in cells) for k in dict.fromkeys(c["best_dmq"] for c in cells)}
        kept = sum(not c["search_info"][k]["accepted"] for c in cells for k in ("DEIS searched", "UniPC searched"))
        fits = [c["search_info"][k] for c in cells for k in c["search_info"] if k.endswith("+ fitted")]
        lines += ["", ("" if many else f"Goal met in {met} of {len(cells)} cells. ")
                  + "At NFE 5 the searched schedule at least halves the "
                  + f"RMSE of the same solver on its default grid in {halved(five, False)} of {len(five)} cells (best "
                  "of DEIS and UniPC)"
                  + (f", and with fitted coefficients in {halved(five, True)} of {len(five)}" if fits else "")
                  + ". Best dmq option: " + ", ".join(f"{k} {v}x" for k, v in wins.items()) + f". {kept} of "
                  f"{2 * len(cells)} schedule searches were rejected by their held-out check (default grid kept)"
                  + (f", and {sum(not f['accepted'] for f in fits)} of {len(fits)} coefficient fits (the solver's "
                     "own coefficients kept)" if fits else "")
                  + f". Wall time {data['gmm']['seconds'] / 60:.0f} min"
                  + (f" for the rerun ({data['gmm']['seconds_before'] / 60:.0f} min for the run before)"
                     if "seconds_before" in data["gmm"] else "") + "."]
        old = data.get("gmm_schedules_only")
        if old is not None:
            lines += ["", f"Before the coefficient fit (schedules and DC ratios only, 24 search latents, the 32 "
                      f"evaluation latents of the runs before, commit {old['commit']}): "
                      f"goal met in {sum(c['ratio'] <= 0.7 for c in old['cells'])} of {len(old['cells'])} cells, "
                      f"NFE-5 halving in {halved([c for c in old['cells'] if c['nfe'] == 5], False)} of "
                      f"{sum(c['nfe'] == 5 for c in old['cells'])}."]
        for key in (k for k in data if k.startswith("gmm_r")):  # the same cells with the fitted tables refined
            run, base = data[key], {(c["mixture"], c["guidance"], c["nfe"]): c for c in data["gmm"]["cells"]}
            pairs = [(base[(c["mixture"], c["guidance"], c["nfe"])], c) for c in run["cells"]]
            fitted = [(min(v for k, v in b["dmq"].items() if k.endswith("+ fitted")),
                       min(v for k, v in c["dmq"].items() if k.endswith("+ fitted"))) for b, c in pairs]
            kept = sum(bool(v.get("refined")) for _, c in pairs for k, v in c["search_info"].items()
                       if k.endswith("+ fitted"))
            worst = max(pairs, key=lambda p: p[1]["ratio"] / p[0]["ratio"])
            lines += ["", f"With the fitted tables refined as a whole (`{run['command']}`, commit "
                      f"{', '.join(sorted({c['commit'] for _, c in pairs}))}), on the same {len(pairs)} cells of "
                      f"NFE {', '.join(str(n) for n in sorted({c['nfe'] for _, c in pairs}))}: the refined table was "
                      f"kept by its held-out check in {kept} of {2 * len(pairs)} fits. The best fitted option's RMSE "
                      f"went down in {sum(a > b for a, b in fitted)} cells and up in {sum(a < b for a, b in fitted)}; "
                      f"the ratio to the best diffusers pair ranges {min(c['ratio'] for _, c in pairs):.2f}-"
                      f"{max(c['ratio'] for _, c in pairs):.2f}x (without: "
                      f"{min(b['ratio'] for b, _ in pairs):.2f}-{max(b['ratio'] for b, _ in pairs):.2f}x), and the "
                      f"NFE-5 halving is met in {halved([c for _, c in pairs if c['nfe'] == 5], True)} of "
                      f"{sum(c['nfe'] == 5 for _, c in pairs)} (without: "
                      f"{halved([b for b, _ in pairs if b['nfe'] == 5], True)}). The worst change: "
                      f"{worst[1]['mixture'].replace('GaussianMixture.random', '')} at guidance "
                      f"{worst[1]['guidance']:g}, {worst[0]['ratio']:.2f}x to {worst[1]['ratio']:.2f}x."]
        for key in sorted((k for k in data if k.startswith("gmm_search")), key=lambda k: int(k[10:])):
            run = data[key]
            if "eval_latents" in run:  # the same evaluation latents as the main table: its verdicts, cell by cell
                miss = [c for c in run["cells"] if c["ratio"] > 0.7]
                lines += ["", f"Searched on {run['search_latents']} latents instead ({run['held_out']} of them held "
                          f"out; `{run['command']}` at commit {run['commit']}), on the same {run['eval_latents']} "
                          f"evaluation latents: goal met in {len(run['cells']) - len(miss)} of {len(run['cells'])} "
                          f"cells (the upper end of the 90% interval below 0.70 in "
                          f"{sum(c['ratio_interval'][1] <= 0.7 for c in run['cells'])})"
                          + ("; missed in " + ", ".join(
                              f"{c['mixture'].replace('GaussianMixture.random', '')} at guidance {c['guidance']:g} "
                              f"and NFE {c['nfe']} ({c['ratio']:.2f})" for c in miss) if miss else "")
                          + f". On the first 32 evaluation latents alone: met in "
                          f"{sum(c['eval32']['ratio'] <= 0.7 for c in run['cells'])}."]
                continue
            base = (old or data["gmm"])["cells"]
            ratios = [b["ratio"] / a["ratio"] for a, b in zip(base, run["cells"])]
            gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            lines += ["", f"Searched on {run['search_latents']} latents instead of 24 (`{run['command']}` at commit "
                      f"{run['commit']}, schedules only, a third held out, the 32 evaluation latents of the runs "
                      f"before): goal met in {sum(c['ratio'] <= 0.7 for c in run['cells'])} of {len(run['cells'])} "
                      f"cells; against the 24-latent schedules-only run the ratio fell in "
                      f"{sum(r < 1 for r in ratios)} cells and rose in the others (geometric mean of the change "
                      f"{gm:.2f}x, from {min(ratios):.2f}x to {max(ratios):.2f}x)."]
    parts = [k for k in data if k.split("_")[0] in ("models", "quant")]
    rows = [c for part in sorted(parts, key=lambda k: (k.split("_")[0] != "models", k)) for c in data[part]["cells"]]
    if rows:
        lines += ["", "Bundled models (1000-step DDIM reference of the full-precision model, guidance 2):", "",
                  "| model | NFE | best dmq | RMSE | best diffusers | RMSE | ratio | searched / default (DEIS, UniPC) "
                  "| + fitted / default (DEIS, UniPC) |",
                  "|---|---:|---|---:|---|---:|---:|---|---|"]
        for c in rows:
            sv = c["searched_vs_default"]
            tag = "" if "commit" in c else " †"
            fit = (f"{sv['DEIS + fitted']:.2f}, {sv['UniPC + fitted']:.2f}" if "DEIS + fitted" in sv else "–")
            lines.append(f"| {c['model']}{_cell_tag(c)}{tag} | {c['nfe']} | {c['best_dmq']} | "
                         f"{c['dmq'][c['best_dmq']]:.4f} | "
                         f"{c['best_peer'].replace('|', ', ')} | {c['best_peer_rmse']:.4f} | {cell_text(c)} | "
                         f"{sv['DEIS']:.2f}, {sv['UniPC']:.2f} | {fit} |")
        if any("commit" not in c for c in rows):
            lines.append("\n† measured by an earlier run, before the solver-variant search and the fix that kept a "
                         "searched schedule in `from_config(config)` (its DC-Solver row ran on the default grid).")
        for c in rows:
            won = {k: v["variant"] for k, v in c["search_info"].items() if v.get("variant")}
            if won:
                lines.append(f"\n{c['model']}{_cell_tag(c)}, NFE {c['nfe']}: solver variants chosen by the "
                             "search: "
                             + "; ".join(f"{k.split()[0]} {v}" for k, v in won.items()) + ".")
        for c in rows:
            if "goal" in c:
                gl, e32 = c["goal"], c.get("eval32")
                line = (f"\n{c['model']}{_cell_tag(c)}, NFE {c['nfe']}: quantized + searched "
                        f"{gl['quantized_searched_rmse']:.4f} "
                        f"vs full precision on its default grid {gl['fp_default_rmse']:.4f}: "
                        + ("goal met" if gl["met"] else "goal missed"))
                if e32:  # the same options on the 32 evaluation latents of the runs before
                    q32 = e32["dmq"][c["best_dmq"]]
                    fp32 = min(v for k, v in e32["default"].items() if k.startswith("FP "))
                    line += (f" (on the first 32 latents: {q32:.4f} vs {fp32:.4f}, "
                             + ("met)" if q32 < fp32 else "missed)"))
                lines.append(line + ".")
    for key in (k for k in data if k.split("_")[0] == "floor"):
        fl = data[key]
        many = fl.get("eval_latents", 32)
        where = "" if many == 32 else f" on {many} evaluation latents ({fl['q_fine_rmse_eval32']:.4f} on the first 32)"
        flags = "" if many == 32 else f" --model-eval-latents {many}"
        lines.append(f"\nThe {fl.get('config', 'w4a8').upper()} DiT's own 1000-step solve is {fl['q_fine_rmse']:.4f} "
                     f"RMSE from the full-precision reference{where} "
                     f"(`--parts floor{flags}`, commit {fl['commit']}): no sampler of the quantized model gets "
                     "below that by solving its ODE more exactly. Default grids on the same latents, RMSE (median "
                     "per-latent RMSE): " + "; ".join(f"{k} {v['rmse']:.4f} ({v['median_latent_rmse']:.4f})"
                                                      for k, v in fl["defaults"].items()) + ".")
    return "\n".join(lines)


def _cell_tag(cell: dict) -> str:
    """A bundled-model cell's evaluation-latent count (where not the first runs' 32) and :func:`_search_tag`."""
    many = f" ({cell['eval_latents']} latents)" if cell.get("eval_latents", 32) != 32 else ""
    return many + _search_tag(cell)


def _search_tag(cell: dict) -> str:
    """How a bundled-model cell searched, where it differs from the first runs (16 latents, sequential fit)."""
    tag = ""
    if cell.get("search_latents", 16) != 16:
        tag += f" (searched on {cell['search_latents']}, {cell['held_out']} held out)"
    refine = {(v["refine_iters"], v.get("refine_optimizer", "lbfgs")) for v in cell["search_info"].values()
              if v.get("refine_iters")}
    if refine:
        iters, opt = max(refine)
        tag += f" (tables refined, {iters} {'Adam' if opt == 'adam' else 'L-BFGS'} iterations)"
    return tag


def samplers_objectives_table(data: dict) -> str:
    """Schedule-search objectives (issue 17): evaluation RMSE of each robust objective relative to "mse"."""
    lines = [f"`{data['command']}` ({data['machine']}). {data['note'][0].upper()}{data['note'][1:]}", "",
             "| solver | objective | cells | lower RMSE than `mse` in | geometric mean of RMSE / `mse` | range |",
             "|---|---|---:|---:|---:|---|"]
    for solver in ("DEIS", "UniPC"):
        rows = [r for r in data["rows"] if f"{solver} mse" in r]
        for objective in ("geomean", "median"):
            ratios = [r[f"{solver} {objective}"][0] / r[f"{solver} mse"][0] for r in rows]
            if not ratios:
                continue
            gmean = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
            lines.append(f"| {solver} | `{objective}` | {len(ratios)} | {sum(v < 1 for v in ratios)} | {gmean:.2f} | "
                         f"{min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines)


def lora_table(data: dict) -> str:
    """``benchmarks/lora.json`` (scripts/bench_lora.py): LoRA latency on dmq-quantized backbones against BF16 with
    the same adapters."""
    lines = [f"`{data['command']}`: SD3 transformer, {data['layers']} blocks, width {data['dim']}, batch "
             f"{data['batch']}, BF16, {data['threads']} thread(s), torch {data['torch']}; median of {data['reps']} "
             "interleaved rounds on a shared machine.", "",
             "| variant | adapters | ms | x BF16 (same adapters) | x no LoRA |", "|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['variant']} | {r['adapters']} | {r['latency_s'] * 1e3:.1f} | "
                     f"{r['vs_bf16_same_adapters']:.2f} | {r['lora_overhead']:.2f} |")
    return "\n".join(lines)


RENDERERS = {
    "families": families_table,
    "demo": demo_table, "quant": quant_table, "quant_methods": quant_methods_table,
    "quant_keep_fp": quant_keep_fp_table, "quant_tables": quant_tables_table, "scale": scale_table,
    "formats": formats_table, "samplers_gmm": samplers_gmm_table, "samplers_deis_grids": samplers_deis_grids_table,
    "samplers_digits": samplers_digits_table, "samplers_dc": samplers_dc_table,
    "samplers_dc_digits": samplers_dc_digits_table, "runtime": runtime_table,
    "samplers_fit": samplers_fit_table, "samplers_objectives": samplers_objectives_table, "lora": lora_table,
}
SOURCES = {"digits": (load_digits_quality, digits_table), "headline": (load_headline, headline_table)}


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with every part between the ``bench:NAME`` markers replaced by ``body`` (unchanged without
    markers)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def pages(root: Path = ROOT) -> list[Path]:
    """The Markdown pages whose tables are generated: README.md and every page under docs/."""
    return [root / "README.md"] + sorted((root / "docs").glob("**/*.md"))


def tables(root: Path = ROOT) -> dict[str, str]:
    """Every table that can be rendered from the files present, by block name."""
    out = {}
    for name, render in RENDERERS.items():
        path = root / "benchmarks" / f"{name}.json"
        if path.exists():
            out[name] = render(json.loads(path.read_text()))
    for name, (load, render) in SOURCES.items():
        data = load()
        if data is not None:
            out[name] = render(data)
    return out


def render(text: str, bodies: dict[str, str]) -> str:
    for name, body in bodies.items():
        text = replace_block(text, name, body)
    return text


def main() -> None:
    bodies = tables()
    for page in pages():
        text = page.read_text()
        new = render(text, bodies)
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
