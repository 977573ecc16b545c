"""GPU readiness: the CUDA integer and FP8 GEMM paths against fake quantization, then latency against BF16 and torchao.

    python scripts/gpu_check.py --out benchmarks/gpu_check.json

1. Exactness (seconds): ``dmq.kernels.int_mm`` on ``torch._int_mm`` against an int64 matmul (bit for bit);
   ``dmq.kernels.int_linear`` and ``dmq.kernels.fp8_linear`` (``torch._scaled_mm``, compute capability 8.9+)
   against the float64 value of the fake-quantized product, within their stated float bounds.
2. Latency (a few minutes): a DiT-XL/2 (28 blocks, width 1152, 256 tokens) and a stack of Flux-width single-stream
   blocks (width 3072), random weights, BF16, batch 2 (one image with classifier-free guidance). Variants: BF16,
   dmq ``w8a8``, ``fp8``, ``w4a16``, ``nvfp4`` (calibrated with min-max on one call: the estimator does not change
   the speed), and torchao's int8 dynamic, float8 dynamic and int4 weight-only where torchao is installed. Timed with
   CUDA events in interleaved rounds; medians and ratios to BF16.

Without a CUDA device it prints why and exits 0 (CI never needs a GPU). It needs no network.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402
from dmq import formats, kernels  # noqa: E402
from dmq.config import DEFAULT_KEEP_FP  # noqa: E402
from dmq.fake_quant import fake_quant  # noqa: E402

U32 = 2.0**-24
PRESETS = ("w8a8", "fp8", "w4a16", "nvfp4")


# ------------------------------------------------------------------------------------------------ exactness
def check_int(dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m, k, n in ((1, 64, 32), (17, 256, 64), (300, 1152, 512)):
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        got = kernels.int_mm(a.to(dev), b.to(dev)).cpu()
        out[f"int_mm_{m}x{k}x{n}_exact"] = bool(torch.equal(got.long(), a.long() @ b.long().t()))
    # one layer: uint8 activations with a zero point, int8 weights per channel, bias, bfloat16
    x = (torch.randn(2, 256, 1152, generator=g) * 2).to(dev, torch.bfloat16)
    wc = torch.randint(-127, 128, (512, 1152), generator=g, dtype=torch.int8).to(dev)
    ws = (torch.rand(512, generator=g) * 0.01 + 1e-3).to(dev)
    bias = torch.randn(512, generator=g).to(dev, torch.bfloat16)
    s, z = torch.tensor(0.031, device=dev).reshape(1, 1, 1), torch.tensor(131.0, device=dev).reshape(1, 1, 1)
    y = kernels.int_linear(x, s, z, 8, False, wc, ws, wc.to(torch.int32).sum(1), bias)
    codes = kernels.act_codes(x, s, z, 0, 255).double()
    xq = (codes - z.double()) * s.to(torch.bfloat16).double()
    exact = xq @ (wc.double() * ws.double().reshape(-1, 1)).t() + bias.double()
    bound = 4 * U32 * (exact.abs() + bias.double().abs()) + 2.0**-8 * exact.abs()
    out["int_linear_within_bound"] = bool(((y.double() - exact).abs() <= bound).all())
    fq = fake_quant(x, formats.get("uint8"), s, z)
    codes_bf = kernels.act_codes(x, s, z, 0, 255)  # in bfloat16, like the fake quantizer's own arithmetic
    out["act_codes_are_fake_quant_codes"] = bool(torch.equal((codes_bf - z.to(torch.bfloat16)) * s.to(torch.bfloat16),
                                                             fq))
    return out


def check_fp8(dev: torch.device) -> dict:
    if not kernels.fp8_supported(dev):
        return {"fp8_scaled_mm": "skipped: needs compute capability 8.9+"}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 1152, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(768, 1152, generator=g) * 4).to(dev).to(torch.float8_e4m3fn)
    ws = (torch.rand(768, generator=g) * 0.1 + 0.01).to(dev)
    s = torch.tensor(0.02, device=dev)
    y = kernels.fp8_linear(x, s, w, ws, None)
    if y is None:
        return {"fp8_scaled_mm": "declined (see the log)"}
    xq = fake_quant(x.float(), formats.get("e4m3"), s.reshape(1, 1)).double()
    wd = w.double() * ws.double().reshape(-1, 1)
    ref = xq @ wd.t()
    # operands exact in float32 (e4m3 x its scale), a K-term float32 sum, then the bfloat16 output rounding
    bound = (1152 + 4) * U32 * (xq.abs() @ wd.abs().t()) + 2.0**-8 * ref.abs()
    return {"fp8_scaled_mm_within_bound": bool(((y.double() - ref).abs() <= bound).all())}


# ------------------------------------------------------------------------------------------------ latency
def build(name: str, layers: int) -> tuple[nn.Module, callable]:
    import diffusers

    torch.manual_seed(0)
    if name == "dit-xl-2":
        m = diffusers.DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
            norm_elementwise_affine=False)

        def inputs(batch, dev):
            g = torch.Generator().manual_seed(7)
            return ((torch.randn(batch, 4, 32, 32, generator=g).to(dev, torch.bfloat16),
                     torch.full((batch,), 500.0, device=dev)), {"class_labels": torch.zeros(batch, dtype=torch.long,
                                                                                             device=dev)})
        return m, inputs
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    class Stack(nn.Module):
        """Flux single-stream blocks (width 3072, 24 heads x 128) on 1024 image + 512 text tokens."""

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(FluxSingleTransformerBlock(3072, 24, 128) for _ in range(layers))

        def forward(self, hidden, timestep, text, temb):
            for b in self.blocks:
                text, hidden = b(hidden, text, temb)
            return hidden

    def inputs(batch, dev):
        g = torch.Generator().manual_seed(7)
        t = [torch.randn(batch, n, 3072, generator=g).to(dev, torch.bfloat16) for n in (1024, 512)]
        temb = torch.randn(batch, 3072, generator=g).to(dev, torch.bfloat16)
        return (t[0], torch.full((batch,), 500.0, device=dev), t[1], temb), {}
    return Stack().eval(), inputs


def variant(model: nn.Module, name: str, inputs, dev) -> nn.Module:
    m = copy.deepcopy(model).to(dev, torch.bfloat16)
    if name == "bf16":
        return m
    if name in PRESETS:
        cfg = dmq.get_config(name)
        if cfg.act is not None and not cfg.act.dynamic:
            cfg = cfg.replace(act=replace(cfg.act, estimator="minmax"))
        if cfg.attn is not None and not cfg.attn.dynamic:
            cfg = cfg.replace(attn=replace(cfg.attn, estimator="minmax"), attn_probs=None)
        cfg = cfg.replace(weight=replace(cfg.weight, estimator="minmax"))
        q = dmq.quantize(m, cfg)
        args, kw = inputs(2, dev)
        dmq.calibrate(q, lambda mm: mm(*args, **kw))
        return dmq.freeze(q)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    cfg = {"torchao-int8dyn": Int8DynamicActivationInt8WeightConfig(), "torchao-int4wo": Int4WeightOnlyConfig(),
           "torchao-fp8dyn": Float8DynamicActivationFloat8WeightConfig()}[name]
    quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and not any(
        fnmatch.fnmatchcase(fqn, p) for p in DEFAULT_KEEP_FP))
    return m


def time_variants(models: dict[str, nn.Module], inputs, dev, reps: int) -> dict[str, float]:
    args, kw = inputs(2, dev)
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(reps + 1):  # round 0 warms up
        for n, m in models.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad():
                start.record()
                m(*args, **kw)
                end.record()
            torch.cuda.synchronize(dev)
            if r:
                times[n].append(start.elapsed_time(end) / 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/gpu_check.json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flux-layers", type=int, default=4)
    ap.add_argument("--dit-layers", type=int, default=28)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (CI never needs one)")
        return
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
              "torch": torch.__version__, "checks": {**check_int(dev), **check_fp8(dev)}, "latency": []}
    print(json.dumps(report["checks"], indent=1), flush=True)
    try:
        import torchao  # noqa: F401

        peers = ["torchao-int8dyn", "torchao-fp8dyn", "torchao-int4wo"]
    except ImportError:
        peers = []
    for name, layers in (("dit-xl-2", args.dit_layers), ("flux-single", args.flux_layers)):
        base, inputs = build(name, layers)
        models = {}
        for v in ("bf16", *PRESETS, *peers):
            try:
                models[v] = variant(base, v, inputs, dev)
            except Exception as e:  # noqa: BLE001 -- a variant that does not run on this GPU is reported
                report["latency"].append({"model": name, "variant": v, "error": f"{type(e).__name__}: {e}"[:300]})
        del base
        lat = time_variants(models, inputs, dev, args.reps)
        for v, s in lat.items():
            row = {"model": name, "layers": layers, "variant": v, "latency_s": s, "vs_bf16": s / lat["bf16"]}
            report["latency"].append(row)
            print(f"{name:12s} {v:16s} {s * 1e3:8.2f} ms  {row['vs_bf16']:.2f}x bf16", flush=True)
        models.clear()
        torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [k for k, v in report["checks"].items() if v is False]
    if failed:
        raise SystemExit(f"gpu_check: failed checks {failed}")


if __name__ == "__main__":
    main()
