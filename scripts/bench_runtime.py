"""Real low-bit execution: resident weight bytes, checkpoint bytes, peak RSS and latency per denoiser call.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_runtime.py --out benchmarks/runtime.json

Backbones: the bundled digit U-Net and DiT, and a large DiT built from a config (width 1152 = 16 heads x 72, patch 2,
32x32x4 latents, random weights, ``--large-layers`` blocks; DiT-XL/2 has 28). Variants: FP32, BF16, every frozen dmq
preset listed in ``--presets`` (on the BF16 model; ``preset+variant`` names too, such as ``w8a8+sdpa+uniform``, dmq
laid out as the peers are: attention in SDPA, adaLN quantized like the other layers), and the peers that run here:
torchao int8 dynamic-activation + int8 weight and int4 weight-only, optimum-quanto W8A8, W4A8 and W4 weight-only (same
layers as dmq: ``DEFAULT_KEEP_FP`` stays in full precision for everyone). Each backbone runs in its own subprocess, in
two phases. Memory: each variant is built from a freshly loaded backbone after the previous one is freed; its peak RSS
is the Linux high-water mark over one call per batch size, reset once the variant is built (it includes the process's
own ~1 GB of libraries). Latency: all variants are built again and timed in interleaved rounds (after a warm-up round),
so that load from other processes on a shared machine slows all of them alike; medians are reported. In each round a
variant runs ``--warm-calls`` untimed calls right before its timed one (default 1), so that it is timed as a sampler's
next call finds it, not in the caches and heap the previous variant left: with one call per round, an FP32 model timed
just before made the bundled DiT's next W8A8 call about 4 ms (13%) slower.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402
from dmq import structure  # noqa: E402
from dmq.config import DEFAULT_KEEP_FP  # noqa: E402
from dmq.spill import return_freed_memory  # noqa: E402

PEERS = ("torchao-int8dyn", "torchao-int4wo", "quanto-w8a8", "quanto-w4a8", "quanto-w4")
DEFAULT_PRESETS = ("w8a8", "w4a8", "w4a16", "fp8", "w4a8-fp", "mxfp4", "nvfp4")


# ------------------------------------------------------------------------------------------------- models
def build(model: str, layers: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The float32 backbone and its input shape ``(C, H, W)``."""
    import diffusers

    if model == "digits-unet":
        return diffusers.UNet2DModel.from_pretrained(str(ROOT / "assets/digits-unet/unet")).eval(), (1, 16, 16)
    if model == "digits-dit":
        m = diffusers.DiTTransformer2DModel.from_pretrained(str(ROOT / "assets/digits-dit/transformer"))
        return m.eval(), (1, 16, 16)
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return m.eval(), (4, 32, 32)


def inputs(shape: tuple[int, int, int], batch: int, dtype: torch.dtype, seed: int = 0, t: float = 500.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g).to(dtype)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return x, torch.full((batch,), t), labels


def call(model: nn.Module, x, t, labels) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: quanto's frozen modules reject inference tensors
        return model(x, t, class_labels=labels).sample


def kept_layers(model: nn.Module) -> list[str]:
    """The layers dmq keeps in 16 bits by default (structural roles resolved on this model), for the peers too."""
    return list(structure.expand_patterns(model, DEFAULT_KEEP_FP))


# ------------------------------------------------------------------------------------------------ variants
class PathsOff(nn.Module):
    """``model`` called with the named execution paths off (:func:`dmq.kernels.disable`), for an on/off comparison
    of one path in the same run."""

    def __init__(self, model: nn.Module, *paths: str) -> None:
        super().__init__()
        self.model, self.paths = model, paths

    def forward(self, *args, **kwargs):
        with dmq.kernels.disable(*self.paths):
            return self.model(*args, **kwargs)


def make_variant(model: nn.Module, variant: str, shape, ckpt_dir: str, estimator: str = "minmax"
                 ) -> tuple[nn.Module, int | None]:
    """The variant of ``model`` and its checkpoint size in bytes (None when it cannot be saved here).

    ``name+compile`` is ``torch.compile`` of variant ``name`` (compiled in the warm-up round); ``preset+cache`` keeps
    a dequantized weight copy for the layers without a fused low-bit kernel (:func:`dmq.kernels.cache_weights`);
    ``preset+prepack`` keeps the oneDNN / int4pack copies of the weights (:func:`dmq.kernels.prepack_weights`);
    ``preset+pytorch`` runs every call with the fused C loops off (``dmq.kernels.disable("native16")``)."""
    if variant.endswith("+pytorch"):
        m, size = make_variant(model, variant.removesuffix("+pytorch"), shape, ckpt_dir, estimator)
        return PathsOff(m, "native16"), size
    if variant.endswith("+compile"):
        m, size = make_variant(model, variant.removesuffix("+compile"), shape, ckpt_dir, estimator)
        return torch.compile(m, fullgraph=True), size  # one graph: a frozen dmq model has no graph break
    if variant.endswith("+cache"):
        m, size = make_variant(model, variant.removesuffix("+cache"), shape, ckpt_dir, estimator)
        dmq.kernels.cache_weights(m)
        return m, size
    if variant.endswith("+prepack"):
        m, size = make_variant(model, variant.removesuffix("+prepack"), shape, ckpt_dir, estimator)
        dmq.kernels.prepack_weights(m)
        return m, size
    if variant == "fp32":
        return model, _safetensors_bytes(model, ckpt_dir)
    bf16 = model.to(torch.bfloat16)
    if variant == "bf16":
        return bf16, _safetensors_bytes(bf16, ckpt_dir)
    if variant.split("+")[0] in dmq.preset_names():  # a preset, or preset+variant (dmq.VARIANTS)
        q = dmq.quantize(bf16, _estimator(dmq.get_config(variant), estimator))
        dmq.calibrate(q, lambda m: [call(m, *inputs(shape, 2, torch.bfloat16, seed=s, t=t))
                                    for s, t in ((1, 900.0), (2, 500.0), (3, 100.0))])
        dmq.freeze(q)
        path = os.path.join(ckpt_dir, "dmq.safetensors")
        dmq.save(q, path)
        return q, os.path.getsize(path)
    if variant.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_

        cfg = Int8DynamicActivationInt8WeightConfig() if variant == "torchao-int8dyn" else Int4WeightOnlyConfig()
        kept = set(kept_layers(bf16))
        quantize_(bf16, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in kept)
        call(bf16, *inputs(shape, 1, torch.bfloat16))  # fail here, not in the timing loop
        return bf16, _torch_save_bytes(bf16)
    if variant.startswith("quanto"):
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        if variant in ("quanto-w8a8", "quanto-w4a8"):
            w = qint8 if variant == "quanto-w8a8" else qint4
            quantize(bf16, weights=w, activations=qint8, exclude=kept_layers(bf16))
            with Calibration():
                call(bf16, *inputs(shape, 2, torch.bfloat16, seed=1))
        else:
            quantize(bf16, weights=qint4, exclude=kept_layers(bf16))
        freeze(bf16)
        return bf16, _torch_save_bytes(bf16)
    raise ValueError(f"unknown variant {variant!r}")


def _estimator(cfg, estimator: str):
    """The preset with every static range estimator set to ``estimator`` and its weights rounded to nearest
    ("preset": unchanged). The estimator and the rounding move the scales and the codes, never the layouts or the
    kernels, so latency does not depend on them; min-max ranges with round-to-nearest calibrate in seconds (GPTQ on
    every layer of a 28-block DiT takes far longer than the timing)."""
    if estimator == "preset":
        return cfg
    from dataclasses import replace

    def fix(spec):
        return None if spec is None or spec.dynamic else replace(spec, estimator=estimator)

    changes = {k: fix(getattr(cfg, k)) for k in ("act", "attn", "attn_probs") if getattr(cfg, k) is not None}
    if cfg.weight is not None and cfg.weight.estimator == "mse":
        changes["weight"] = replace(cfg.weight, estimator=estimator)
    changes = {k: v for k, v in changes.items() if v is not None}
    return cfg.replace(**changes, rounding="rtn", per_sample_rounding="rtn")


def _safetensors_bytes(model: nn.Module, ckpt_dir: str) -> int:
    from safetensors.torch import save_file

    path = os.path.join(ckpt_dir, "fp.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def _torch_save_bytes(model: nn.Module) -> int | None:
    buf = io.BytesIO()
    try:
        torch.save(model.state_dict(), buf)
    except Exception:  # noqa: BLE001 -- a peer's tensor subclass that does not pickle: report no size
        return None
    return buf.tell()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, looking through tensor subclasses (torchao, quanto) to the plain tensors they hold."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


# ------------------------------------------------------------------------------------------------ measuring
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    except OSError:
        pass


def measure_memory(args, variant_name: str) -> dict:
    """Phase 1, one variant at a time: bytes, checkpoint, and the peak RSS of one call per batch size."""
    model, shape = build(args.model, args.large_layers)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        variant, ckpt = make_variant(model, variant_name, shape, d, args.estimator)
        setup_s = time.perf_counter() - t0
    del model
    gc.collect()
    row = {"model": args.model, "variant": variant_name, "params": n_params, "weight_bytes": weight_bytes(variant),
           "checkpoint_bytes": ckpt, "setup_s": setup_s, "rss_after_setup": _status("VmRSS")}
    if hasattr(variant, "_dmq"):
        rep = dmq.weight_bytes(variant)
        row["bytes_per_quantized_param"] = rep["bytes_per_param"]
        row["quantized_params"] = rep["quantized_params"]
        row["exec_paths"] = sorted({variant.get_submodule(n).exec_path for n in variant._dmq.modules})
        row["weight_cache_bytes"] = dmq.kernels.cached_bytes(variant)
    _reset_peak()
    dtype = torch.float32 if variant_name == "fp32" else torch.bfloat16
    for batch in args.batches:
        call(variant, *inputs(shape, batch, dtype, seed=7))
    row["peak_rss_running"] = _status("VmHWM")
    if hasattr(variant, "_dmq"):
        row["weight_cache_bytes"] = dmq.kernels.cached_bytes(variant)  # built on the first call
        row["kernel_bytes"] = dmq.kernels.kernel_bytes(variant)  # every copy and table beside the packed weights
    return row


def measure_latency(args, names: list[str]) -> dict[str, dict[str, float]]:
    """Phase 2, all variants built again and timed in interleaved rounds, so that a busy machine slows all alike."""
    variants = {}
    for name in list(names):
        model, shape = build(args.model, args.large_layers)
        try:
            with tempfile.TemporaryDirectory() as d:
                variants[name] = make_variant(model, name, shape, d, args.estimator)[0]
        except Exception as e:  # noqa: BLE001 -- reported in the row, not fatal
            print(f"variant {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        # the float32 backbone each build starts from is freed, but its heap pages stay resident without a trim:
        # twelve 28-block DiT-XL/2 variants held 18 GB instead of about 10
        del model
        gc.collect()
        return_freed_memory()
        print(f"built {name}: RSS {_status('VmRSS') / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in names}
    for batch in args.batches:
        reps = args.reps if batch <= 2 else args.reps_large_batch
        # round 0 warms up; a large batch after a smaller one may skip it (every kernel state and table is built)
        first = 1 if batch > 2 and args.no_large_batch_warmup and batch != args.batches[0] else 0
        for r in range(first, reps + 1):
            for name, model in list(variants.items()):
                x = inputs(shape, batch, torch.float32 if name == "fp32" else torch.bfloat16, seed=7)
                try:
                    # untimed calls first: the timed one then finds the caches and the heap as a sampler's next
                    # call does, not as the previous variant (another model, often FP32) left them
                    for _ in range(args.warm_calls if r else 0):
                        call(model, *x)
                    t0 = time.perf_counter()
                    call(model, *x)
                except Exception as e:  # noqa: BLE001 -- e.g. a compile failure: drop the variant
                    print(f"variant {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    del variants[name]
                    continue
                if r:
                    times[name][batch].append(time.perf_counter() - t0)
                    # progress on stderr: a run stopped early (a 28-block DiT-XL/2 call at batch 32 takes minutes)
                    # still leaves its timings in the log
                    print(f"timed {name} b{batch} round {r}: {times[name][batch][-1]:.3f} s", file=sys.stderr,
                          flush=True)
    return {n: {f"latency_b{b}_s": statistics.median(v) for b, v in t.items() if v} | {
        f"reps_b{b}": len(v) for b, v in t.items()} for n, t in times.items()}


def gemm_candidates(m: int = 512, k: int = 1152, n: int = 4608, reps: int = 9) -> dict[str, float]:
    """One DiT-XL MLP GEMM (batch 1 with guidance: 512 x 1152 x 4608) on every kernel a layer could use here,
    interleaved rounds, median seconds: what the execution paths of :mod:`dmq.kernels` were chosen by."""
    from dmq import kernels, kernels_cpu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    xf, wf = x.float(), w.float()
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01
    s, z = torch.tensor(0.05).to(torch.bfloat16).reshape(1, 1), torch.tensor(128.0).to(torch.bfloat16).reshape(1, 1)
    fns = {
        "bf16 F.linear": lambda: torch.nn.functional.linear(x, w),
        "fp32 F.linear": lambda: torch.nn.functional.linear(xf, wf),
        "int8 torch._int_mm (s8 x s8 -> s32)": lambda: torch._int_mm(xs, wq.t()),
        "activation codes (u8, eager, exact)": lambda: kernels.act_codes(x, s, z, 0, 255).to(torch.uint8),
        "int_gemm path (codes + _int_mm + epilogue)": lambda: kernels.int_linear(
            x, s.float(), z.float(), 8, False, wq, ws, wq.to(torch.int32).sum(1), None),
    }
    if kernels_cpu.onednn_int8_ok():
        pw = kernels_cpu.prepack_int8(wq)
        xu = (xs.to(torch.int16) + 128).to(torch.uint8)
        fns["int8 oneDNN u8 x s8, fused epilogue -> bf16"] = lambda: kernels_cpu.onednn_int8_linear(
            xu, 0.05, 128, pw, ws, None, torch.bfloat16)
    if kernels_cpu.int4_weight_ok():
        packed, sz = kernels_cpu.prepack_int4((wq >> 4), ws.reshape(-1, 1).expand(n, k // 32), 32, torch.bfloat16)
        fns["int4 weight-only _weight_int4pack_mm_for_cpu (g32)"] = lambda: kernels_cpu.int4_weight_linear(
            x, packed, sz, 32, None)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        fns["int8 weight-only _weight_int8pack_mm"] = lambda: torch.ops.aten._weight_int8pack_mm(
            x, wq, ws.to(torch.bfloat16))
    try:
        a8, w8, one = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), torch.tensor(1.0)
        torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        fns["fp8 torch._scaled_mm (CPU)"] = lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one,
                                                                     out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        pass
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps + 1):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants:
        if args.skip_memory:
            rows.append({"model": args.model, "variant": name})
            continue
        try:
            rows.append(measure_memory(args, name))
        except Exception as e:  # noqa: BLE001 -- a peer that does not run here is reported, not fatal
            rows.append({"model": args.model, "variant": name, "error": f"{type(e).__name__}: {e}"[:400]})
        gc.collect()
    ok = [r["variant"] for r in rows if "error" not in r]
    lat = measure_latency(args, ok)
    for r in rows:
        r.update(lat.get(r["variant"], {}), layers=args.large_layers if args.model == "dit-1152" else None)
        print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/runtime.json")
    ap.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit", "dit-1152"])
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--compile", "--compiled", dest="compile", nargs="*", default=["w4a16", "w8a8"],
                    help="variants also timed under torch.compile(fullgraph=True)")
    ap.add_argument("--large-layers", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-large-batch", type=int, default=3)
    ap.add_argument("--no-large-batch-warmup", action="store_true", help="time batches above 2 without a warm-up "
                    "round when a smaller batch ran first (a full-depth DiT-XL/2 call at batch 32 takes minutes)")
    ap.add_argument("--warm-calls", type=int, default=1, help="untimed calls of each variant right before its "
                    "timed call in every round (0: one call per variant per round, as runs before run 17 did)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--estimator", default="minmax", help="static range estimator for calibration, with "
                    "round-to-nearest weights ('preset': the preset's own; they move scales and codes, not kernels)")
    ap.add_argument("--skip-memory", action="store_true", help="latency only (no per-variant memory phase)")
    ap.add_argument("--append", action="store_true", help="add the rows to --out instead of replacing it")
    ap.add_argument("--cached", nargs="*", default=[], help="presets also timed with dmq.kernels.cache_weights")
    ap.add_argument("--prepacked", nargs="*", default=[],
                    help="presets also timed with dmq.kernels.prepack_weights (oneDNN / int4pack weight copies)")
    ap.add_argument("--without-native", nargs="*", default=[],
                    help="presets also timed with dmq.native's fused C loops off (+pytorch: their PyTorch form)")
    ap.add_argument("--gemm", action="store_true", help="also time one GEMM on every candidate kernel")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variants", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.gemm:
        torch.set_num_threads(args.threads)
        gemm = gemm_candidates()
        for name, t in gemm.items():
            print(f"GEMM {name:55s} {t * 1e3:8.2f} ms  {t / gemm['bf16 F.linear']:.2f}x BF16", flush=True)
    rows, t_start = [], time.perf_counter()
    variants = ["fp32", "bf16", *args.presets, *args.peers, *(f"{v}+compile" for v in args.compile),
                *(f"{v}+cache" for v in args.cached), *(f"{v}+prepack" for v in args.prepacked),
                *(f"{v}+pytorch" for v in args.without_native)]
    for model in args.models:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--variants", *variants, "--estimator",
               args.estimator, *(["--skip-memory"] if args.skip_memory else []),
               "--large-layers", str(args.large_layers), "--threads", str(args.threads), "--reps", str(args.reps),
               "--reps-large-batch", str(args.reps_large_batch), "--batches", *map(str, args.batches),
               "--warm-calls", str(args.warm_calls),
               *(["--no-large-batch-warmup"] if args.no_large_batch_warmup else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT)
        done = set()
        for line in proc.stdout:
            if not line.startswith("RESULT "):
                continue
            row = json.loads(line[7:])
            rows.append(row)
            done.add(row["variant"])
            lat = " ".join(f"b{b}={row[f'latency_b{b}_s'] * 1e3:.1f}ms" for b in args.batches
                           if f"latency_b{b}_s" in row)
            print(f"{model:12s} {row['variant']:16s} {lat or row.get('error', '')}", flush=True)
        proc.wait()
        rows += [{"model": model, "variant": v, "error": f"child exited with {proc.returncode}"}
                 for v in variants if v not in done]
    runs, old = [], {}
    if args.append and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        runs = old.get("runs", [{k: v for k, v in old.items() if k not in ("rows", "runs")}])
        for r in rows:  # rows compare only within their run
            r["run"] = len(runs)
        rows = old["rows"] + rows
    out = {
        "command": "python scripts/bench_runtime.py " + " ".join(sys.argv[1:]),
        "load": _load(),
        "cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(), "threads": args.threads,
        "torch": torch.__version__, "large_layers": args.large_layers, "batches": args.batches, "reps": args.reps,
        "reps_large_batch": args.reps_large_batch, "large_batch_warmup": not args.no_large_batch_warmup,
        "warm_calls": args.warm_calls,
        "wall_s": time.perf_counter() - t_start,
        "versions": _versions(), "rows": rows,
    }
    if args.gemm:
        out["gemm_512x1152x4608_s"] = gemm
    elif args.append and "gemm_512x1152x4608_s" in old:
        out["gemm_512x1152x4608_s"] = old["gemm_512x1152x4608_s"]
    if runs:
        out["runs"] = runs + [{k: v for k, v in out.items() if k != "rows"}]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


def _load() -> str:
    """The machine's load while benchmarking (shared machines slow every variant; ratios stay comparable)."""
    try:
        return "loadavg " + Path("/proc/loadavg").read_text().split(" ", 3)[2] + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _versions() -> dict:
    out = {}
    for name in ("torchao", "optimum.quanto", "diffusers"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[name] = f"unavailable: {type(e).__name__}"
    return out


if __name__ == "__main__":
    main()
