"""Throughput of fake quantization for every format, against PyTorch's native float8 cast in the same run.

The native baseline is the equivalent fake quantization ``x.clamp(-max, max).to(float8).to(x.dtype)``; the bare
``x.to(float8)`` cast is timed too. Each round times every candidate once, in turn, so that drift on a noisy
machine hits all of them alike; the report keeps the median over rounds and the ratio to the native E4M3 fake-quant.

    python scripts/bench_formats.py [--numel 16777216] [--rounds 7] [--out benchmarks/formats.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dmq import formats

NAMED = ["int8", "int4", "uint8", "e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "mxfp8", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
         "nvfp4"]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/formats.json")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=g)
    candidates: dict[str, tuple[str, torch.dtype, callable]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).removeprefix("torch.")
        x = (base * 100).to(dtype)  # in range of E4M3, mostly saturating for the narrow grids: both paths are timed
        for f8, mx in ((torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)):
            name = str(f8).removeprefix("torch.float8_")
            candidates[f"native {name} fake-quant|{dn}"] = (
                "native", dtype, lambda x=x, f8=f8, mx=mx: x.clamp(-mx, mx).to(f8).to(x.dtype))
            candidates[f"native {name} cast only|{dn}"] = ("native", dtype, lambda x=x, f8=f8: x.to(f8))
        names = formats.names() if dtype == torch.float32 else NAMED
        for n in names:
            fmt = formats.get(n)
            xs = (base * (fmt.element.max if fmt.is_block else fmt.max) / 4).to(dtype)
            candidates[f"{n}|{dn}"] = ("dmq", dtype, lambda fmt=fmt, xs=xs: fmt.quantize(xs))

    for _, _, fn in candidates.values():  # warm-up: allocator, caches, lazy tables
        fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.rounds):
        for k, (_, _, fn) in candidates.items():
            samples[k].append(_time(fn))

    rows = []
    for k, (kind, dtype, _) in candidates.items():
        name, dn = k.split("|")
        med = statistics.median(samples[k])
        ref = statistics.median(samples[f"native e4m3fn fake-quant|{dn}"])
        fmt = None if kind == "native" else formats.get(name)
        rows.append({
            "format": name, "kind": kind, "dtype": dn,
            "block": bool(fmt is not None and fmt.is_block),
            "median_s": med, "gelem_per_s": args.numel / med / 1e9,
            "throughput_vs_native_e4m3": ref / med,
        })
    result = {
        "benchmark": "formats", "command": "python scripts/bench_formats.py", "numel": args.numel,
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    elem = [r["throughput_vs_native_e4m3"] for r in rows if r["kind"] == "dmq" and not r["block"]]
    print(f"{len(rows)} rows -> {out}; element formats vs native E4M3 fake-quant: "
          f"min {min(elem):.2f}x, median {statistics.median(elem):.2f}x")


if __name__ == "__main__":
    main()
