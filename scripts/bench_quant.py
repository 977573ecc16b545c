"""Benchmark dmq presets (and naive RTN / peer libraries) on the bundled digit U-Net and DiT.

    .venv/bin/python scripts/bench_quant.py --n-samples 200 --steps 50 --out benchmarks/quant.json

Advanced PTQ methods (each row beside its round-to-nearest baseline, the preset before the ``+``):

    .venv/bin/python scripts/bench_quant.py --presets w4a8 w4a6-fp nvfp4 --no-naive --peers \
        --methods w4a8+adaround w4a8+gptq nvfp4+svd32 --out benchmarks/quant_methods.json

Per backbone and method: ε SQNR vs full precision per timestep bin (on inputs captured from the FP trajectory),
final-sample PSNR vs FP at identical seeds (DPMSolverMultistepScheduler), FID against the held-out digits in the
digit classifier's feature space, class accuracy, calibration time, the streaming-statistics size and the process
peak RSS. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
from pathlib import Path

import diffusers
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402
from pipelines import DigitClassifier, DigitsPipeline, load_digits  # noqa: E402
from pipelines.evaluation import DigitsFeatures, class_accuracy, fid_from_stats, psnr  # noqa: E402

EPS_BINS = 4


def load_pipe(kind: str) -> DigitsPipeline:
    folder = ROOT / "assets" / f"digits-{kind}"
    if (folder / "model_index.json").exists():
        pipe = DigitsPipeline.from_pretrained(str(folder))
    elif kind == "unet":
        pipe = DigitsPipeline(scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"),
                              unet=diffusers.UNet2DModel.from_pretrained(str(folder / "unet")))
    else:
        pipe = DigitsPipeline(scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"),
                              transformer=diffusers.DiTTransformer2DModel.from_pretrained(str(folder / "transformer")))
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.backbone.eval()
    return pipe


def set_backbone(pipe: DigitsPipeline, model: torch.nn.Module) -> None:
    if pipe.unet is not None:
        pipe.unet = model
    else:
        pipe.transformer = model


def sample(pipe: DigitsPipeline, labels: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(labels, guidance_scale=2.0, num_inference_steps=steps, generator=gens, output_type="pt").images


def capture_inputs(pipe: DigitsPipeline, labels: torch.Tensor, steps: int, keep: int, rows: int) -> list:
    """(x_t, t, labels) of ``keep`` evenly spaced backbone calls of an FP sampling run, ``rows`` samples each."""
    calls = []
    stride = max(steps // keep, 1)

    def pre(mod, args, kwargs):
        if len(calls) < 10_000:
            calls.append((args[0][:rows].clone(), args[1][:rows].clone(), kwargs["class_labels"][:rows].clone()))

    h = pipe.backbone.register_forward_pre_hook(pre, with_kwargs=True)
    sample(pipe, labels, steps, seed=10_000)
    h.remove()
    return calls[::stride][:keep]


@torch.no_grad()
def eps_outputs(model: torch.nn.Module, inputs: list) -> list[torch.Tensor]:
    return [model(x, t, class_labels=y).sample for x, t, y in inputs]


def eps_sqnr_by_bin(ref: list, out: list, inputs: list) -> dict[str, float]:
    sig, err = [0.0] * EPS_BINS, [0.0] * EPS_BINS
    for r, o, (_, t, _) in zip(ref, out, inputs):
        b = min(int(float(t[0]) / 1000 * EPS_BINS), EPS_BINS - 1)
        sig[b] += float(r.double().pow(2).sum())
        err[b] += float((r.double() - o.double()).pow(2).sum())
    res = {}
    for b in range(EPS_BINS):
        if sig[b] > 0:
            res[f"t{b * 1000 // EPS_BINS}-{(b + 1) * 1000 // EPS_BINS}"] = 10 * torch.log10(
                torch.tensor(sig[b] / max(err[b], 1e-30))).item()
    tot_s, tot_e = sum(sig), sum(err)
    res["all"] = 10 * torch.log10(torch.tensor(tot_s / max(tot_e, 1e-30))).item()
    return res


def naive_config(preset: str) -> dmq.QuantConfig:
    """Round-to-nearest, min-max, per-tensor, symmetric, one timestep bin, no split: the same element formats."""
    cfg = dmq.get_config(preset)

    def elem(spec):
        if spec is None:
            return None
        name = "e2m1" if spec.format in ("mxfp4", "nvfp4") else spec.format
        return dmq.QuantSpec(name, "tensor")

    return cfg.replace(weight=elem(cfg.weight), act=elem(cfg.act), attn=elem(cfg.attn), attn_probs=None,
                       shortcut_split=False, name=f"naive-{preset}")


def int_w4a6() -> dmq.QuantConfig:
    """The INT counterpart of w4a6-fp (FP4DiT's comparison): INT4 per-channel MSE weights, INT6 per-token dynamic
    activations, INT8 per-token attention."""
    return dmq.QuantConfig(weight=dmq.QuantSpec("int4", "channel", estimator="mse"),
                           act=dmq.QuantSpec("int6", "token", dynamic=True),
                           attn=dmq.QuantSpec("int8", "token", dynamic=True), name="int-w4a6-token")


class Evaluator:
    def __init__(self, pipe: DigitsPipeline, args, features: DigitsFeatures, classifier: DigitClassifier):
        self.pipe, self.args, self.features, self.classifier = pipe, args, features, classifier
        n = args.n_samples
        self.labels = torch.arange(n) % 10
        self.fp_model = pipe.backbone
        real, _ = load_digits("test")
        f = features(real.float().clamp(0, 1))
        self.real_stats = (f.mean(0), torch.cov(f.T))
        t0 = time.perf_counter()
        self.fp_images = sample(pipe, self.labels, args.steps, args.seed)
        self.fp_seconds = time.perf_counter() - t0
        self.inputs = capture_inputs(pipe, torch.arange(10), args.steps, keep=args.eps_calls, rows=20)
        self.fp_eps = eps_outputs(self.fp_model, self.inputs)

    def metrics(self, model: torch.nn.Module) -> dict:
        set_backbone(self.pipe, model)
        try:
            images = sample(self.pipe, self.labels, self.args.steps, self.args.seed)
        finally:
            set_backbone(self.pipe, self.fp_model)
        f = self.features(images)
        fid = fid_from_stats(f.mean(0), torch.cov(f.T), *self.real_stats)
        return {
            "eps_sqnr_db": eps_sqnr_by_bin(self.fp_eps, eps_outputs(model, self.inputs), self.inputs),
            "psnr_vs_fp_db": float(psnr(images, self.fp_images)),
            "fid": fid, "class_accuracy": class_accuracy(images, self.labels, self.classifier),
        }

    def calib_loop(self, model: torch.nn.Module) -> None:
        set_backbone(self.pipe, model)
        try:
            labels = torch.arange(self.args.calib_samples) % 10
            sample(self.pipe, labels, self.args.calib_steps, seed=20_000)
        finally:
            set_backbone(self.pipe, self.fp_model)


def int8_dynamic_linear() -> dmq.QuantConfig:
    """torchao's ``Int8DynamicActivationInt8WeightConfig`` setting in dmq terms, for a like-for-like row: INT8
    per-channel weights and INT8 per-token dynamic activations on the Linear layers only (convolutions and the
    attention matmuls stay in full precision)."""
    return dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), act=dmq.QuantSpec("int8", "token", dynamic=True),
                           name="int8-dynamic-linear")


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]


def run_dmq(ev: Evaluator, config, include: list[str] | None = None) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model = dmq.quantize(ev.fp_model, config, include=include, inplace=False)
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    dmq.calibrate(model, ev.calib_loop)
    t_cal = time.perf_counter() - t0
    stats_bytes = dmq.summary(model)["observer_bytes"]
    dmq.freeze(model)
    s = dmq.summary(model)
    res = {"quantize_s": t_quant, "calibrate_s": t_cal, "calibration_points": s["calibration_points"],
           "observer_bytes": stats_bytes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
           "layers": s["layers"], "attention_modules": s["attention"], "shortcut_splits": s["shortcut_splits"]}
    methods = s.get("methods") or {}
    if methods:
        res["methods"] = _method_summary(methods)
        res["lowrank_params_fraction"] = lowrank_fraction(model)
    res.update(ev.metrics(model))
    return res


def lowrank_fraction(model: torch.nn.Module) -> float:
    """Parameters of the 16-bit low-rank branches relative to the quantized layers' weights."""
    lr = w = 0
    for n in model._dmq.modules:
        m = model.get_submodule(n)
        w += m.weight.numel()
        if getattr(m, "lowrank_down", None) is not None:
            lr += m.lowrank_down.numel() + m.lowrank_up.numel()
    return lr / max(w, 1)


def _method_summary(report: dict) -> dict:
    """The JSON-sized part of ``dmq.summary(model)["methods"]``: per-layer errors become their median and mean."""
    out = {}
    for k, v in report.items():
        if k == "error_vs_rtn" and v:
            vals = sorted(v.values())
            out["layer_error_vs_rtn_median"] = vals[len(vals) // 2]
            out["layer_error_vs_rtn_mean"] = sum(vals) / len(vals)
        elif k == "smooth_alpha":
            out["smoothed_groups"] = sum(a is not None for a in v.values())
            out["smooth_alpha"] = v
        else:
            out[k] = v
    return out


def run_mixed(ev: Evaluator, preset: str, bits: float) -> dict:
    """Sensitivity-driven mixed precision at the preset's own weight budget: per-layer INT3 / INT4 / INT8 weights
    (per channel, MSE clipping) allocated under ``bits`` per weight on average, activations as the preset. The
    sensitivity runs on the ε-SQNR inputs (12 FP trajectory calls across timesteps)."""
    from dmq.mixed_precision import allocate, average_bits_budget, measure_sensitivity

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    base = dmq.get_config(preset)
    probe = dmq.quantize(ev.fp_model, base, inplace=False)
    cands = [dmq.QuantSpec(f"int{b}", "channel", estimator="mse") for b in (3, 4, 8)]
    sens = measure_sensitivity(probe, lambda m: eps_outputs(m, ev.inputs[::2]), cands)
    plan = allocate(probe, sens, cands, average_bits_budget(probe, list(sens), bits))
    t_sens = time.perf_counter() - t0
    res = run_dmq(ev, plan.to_config(base))
    counts = {}
    for spec in plan.specs.values():
        counts[spec.format] = counts.get(spec.format, 0) + 1
    res.update({"sensitivity_s": t_sens, "calibrate_s": res["calibrate_s"] + t_sens, "budget_bits": bits,
                "avg_bits": plan.cost_bits / sum(probe.get_submodule(n).weight.numel() for n in plan.specs),
                "layers_per_format": counts,
                "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024})
    return res


def run_peer(ev: Evaluator, name: str) -> dict:
    model = copy.deepcopy(ev.fp_model)
    t0 = time.perf_counter()
    if name.startswith("quanto"):
        import optimum.quanto as oq
        from optimum import quanto
        w = {"quanto-qint8": oq.qint8, "quanto-qint4": oq.qint4, "quanto-qfloat8": oq.qfloat8}[name]
        acts = None if name == "quanto-qint4" else w
        oq.quantize(model, weights=w, activations=acts)
        if acts is not None:
            with oq.Calibration():
                ev.calib_loop(model)
        oq.freeze(model)
        version = quanto.__version__ if hasattr(quanto, "__version__") else "?"
    elif name.startswith("torchao"):
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_
        cfg = Int8DynamicActivationInt8WeightConfig() if name == "torchao-int8-dynamic" else Int4WeightOnlyConfig(
            group_size=32)
        quantize_(model, cfg)
        version = torchao.__version__
    elif name.startswith("modelopt"):
        import modelopt
        import modelopt.torch.quantization as mtq
        cfg = mtq.INT8_DEFAULT_CFG if name == "modelopt-int8" else mtq.FP8_DEFAULT_CFG
        model = mtq.quantize(model, cfg, ev.calib_loop)
        version = modelopt.__version__
    else:
        raise ValueError(name)
    res = {"version": version, "calibrate_s": time.perf_counter() - t0}
    res.update(ev.metrics(model))
    return res


PEERS = ("quanto-qint8", "quanto-qint4", "quanto-qfloat8", "torchao-int8-dynamic", "torchao-int4-weight",
         "modelopt-int8", "modelopt-fp8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    ap.add_argument("--presets", nargs="+", default=dmq.preset_names())
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--calib-samples", type=int, default=20, help="images in the calibration sampling run")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--eps-calls", type=int, default=12, help="FP backbone calls whose inputs measure ε SQNR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--methods", nargs="*", default=[],
                    help="preset+variant rows (dmq.VARIANTS), e.g. w4a8+adaround nvfp4+svd32; compare with the preset")
    ap.add_argument("--mixed", nargs="*", default=[], metavar="PRESET:BITS",
                    help="mixed-precision rows, e.g. w4a8:4 (INT3/4/8 weights at 4 bits per weight on average)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quant.json"))
    ap.add_argument("--append", action="store_true", help="merge the rows into an existing --out file (same protocol)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    features = DigitsFeatures.from_pretrained(str(ROOT / "assets" / "digits-classifier"))
    classifier = DigitClassifier.from_pretrained(str(ROOT / "assets" / "digits-classifier")).eval()
    report = {"command": " ".join(sys.argv), "protocol": vars(args), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "models": {}}
    for kind in args.models:
        pipe = load_pipe(kind)
        ev = Evaluator(pipe, args, features, classifier)
        fp = ev.metrics(ev.fp_model)
        rows = {"fp": {**fp, "sample_s": ev.fp_seconds}}
        print(f"[{kind}] fp: FID {fp['fid']:.3f} acc {fp['class_accuracy']:.3f}", flush=True)
        configs = [(p, p) for p in args.presets]
        if not args.no_naive:
            configs += [(f"naive-{p}", naive_config(p)) for p in args.presets]
        if "w4a6-fp" in args.presets:
            configs.append(("int-w4a6-token", int_w4a6()))
        if any(p.startswith("torchao-int8") for p in args.peers):
            configs.append(("int8-dynamic-linear", int8_dynamic_linear()))
        configs += [(m, m) for m in args.methods]
        for name, cfg in configs:
            include = linear_names(ev.fp_model) if name == "int8-dynamic-linear" else None
            rows[name] = run_dmq(ev, cfg, include)
            r = rows[name]
            print(f"[{kind}] {name}: eps {r['eps_sqnr_db']['all']:.1f} dB, PSNR {r['psnr_vs_fp_db']:.1f}, "
                  f"FID {r['fid']:.3f}, acc {r['class_accuracy']:.3f}, calib {r['calibrate_s']:.1f}s", flush=True)
        for item in args.mixed:
            preset, bits = item.split(":")
            name = f"{preset}+mixed{bits}"
            rows[name] = r = run_mixed(ev, preset, float(bits))
            print(f"[{kind}] {name}: eps {r['eps_sqnr_db']['all']:.1f} dB, FID {r['fid']:.3f}, "
                  f"avg bits {r['avg_bits']:.2f}, calib {r['calibrate_s']:.1f}s", flush=True)
        for peer in args.peers:
            try:
                rows[peer] = run_peer(ev, peer)
                print(f"[{kind}] {peer}: FID {rows[peer]['fid']:.3f}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is recorded, not fatal
                rows[peer] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                print(f"[{kind}] {peer}: skipped ({rows[peer]['skipped']})", flush=True)
        report["models"][kind] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():  # add this run's rows to an earlier run of the same protocol
        old = json.loads(out.read_text())
        keys = ("n_samples", "steps", "calib_samples", "calib_steps", "eps_calls", "seed", "threads")
        if any(old["protocol"][k] != report["protocol"][k] for k in keys):
            raise SystemExit(f"--append: {out} was made with a different protocol")
        old.setdefault("appended_commands", []).append(report["command"])
        for kind, rows in report["models"].items():
            # this run's rows replace the earlier ones of the same name; the full-precision reference stays
            old["models"].setdefault(kind, {}).update({k: v for k, v in rows.items() if k != "fp"
                                                       or k not in old["models"][kind]})
        report = old
    out.write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    head = "| model | method | ε SQNR dB (all) | PSNR vs FP dB | FID | ΔFID % | class acc | calib s |"
    print(head + "\n|" + "---|" * 8)
    for kind, rows in report["models"].items():
        fid0 = rows["fp"]["fid"]
        for name, r in rows.items():
            if "skipped" in r:
                print(f"| {kind} | {name} | skipped: {r['skipped']} | | | | | |")
                continue
            eps = r.get("eps_sqnr_db", {}).get("all", float("inf"))
            ps = r.get("psnr_vs_fp_db", float("inf"))
            print(f"| {kind} | {name} | {eps:.1f} | {ps:.1f} | {r['fid']:.3f} | {100 * (r['fid'] / fid0 - 1):+.1f} | "
                  f"{r['class_accuracy']:.3f} | {r.get('calibrate_s', 0):.1f} |")


if __name__ == "__main__":
    main()
