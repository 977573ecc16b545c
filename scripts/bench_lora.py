"""Latency cost of LoRA on a dmq-quantized backbone: one and two adapters, against the unquantized model with the
same adapters, measured in the same process in interleaved rounds (a busy machine slows every variant alike).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_lora.py --out benchmarks/lora.json

The backbone is an SD3 transformer (random weights, built from a config: no hub) in bfloat16; the adapters are
rank-16 LoRAs on the attention projections, added with peft's ``add_adapter`` as ``load_lora_weights`` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dmq  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build(layers: int, dim: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    heads = dim // 64
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=layers,
                                 attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=dim,
                                 caption_projection_dim=dim, pooled_projection_dim=dim, out_channels=16,
                                 pos_embed_max_size=32).eval().to(torch.bfloat16)


def inputs(dim: int, batch: int):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 16, 32, 32, generator=g).bfloat16(),
            "encoder_hidden_states": torch.randn(batch, 32, dim, generator=g).bfloat16(),
            "pooled_projections": torch.randn(batch, dim, generator=g).bfloat16(),
            "timestep": torch.full((batch,), 500.0)}


def variant(name: str, adapters: int, args):
    model = build(args.layers, args.dim)
    if name != "bf16":
        dmq.freeze(dmq.quantize(model, name))
    for i in range(adapters):
        torch.manual_seed(10 + i)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                          adapter_name=f"lora{i}")
    if adapters:
        model.set_adapters([f"lora{i}" for i in range(adapters)], [1.0] * adapters)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/lora.json")
    ap.add_argument("--presets", nargs="+", default=["w4a16", "nvfp4"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = inputs(args.dim, args.batch)
    models = {}
    for name in ["bf16", *args.presets]:
        for k in (0, 1, 2):
            m = variant(name, k, args)
            if name != "bf16" and m._dmq.config.act is not None and not m._dmq.config.act.dynamic:
                raise SystemExit(f"{name}: static activations need calibration; pick weight-only or dynamic presets")
            models[(name, k)] = m
    times = {key: [] for key in models}
    with torch.no_grad():
        for r in range(args.reps + 1):  # round 0 warms up
            for key, m in models.items():
                t0 = time.perf_counter()
                m(**x, return_dict=False)
                if r:
                    times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for (name, k), t in med.items():
        rows.append({"variant": name, "adapters": k, "latency_s": t,
                     "vs_bf16_same_adapters": t / med[("bf16", k)], "lora_overhead": t / med[(name, 0)]})
        print(f"{name:8s} adapters={k} {t * 1e3:8.1f} ms  x{t / med[('bf16', k)]:.2f} vs bf16, "
              f"x{t / med[(name, 0)]:.2f} vs no LoRA", flush=True)
    out = {"command": "python scripts/bench_lora.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": args.threads, "layers": args.layers,
           "dim": args.dim, "batch": args.batch, "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
