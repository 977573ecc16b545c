"""`make demo`: the main job on the bundled defaults.

1. Number formats: for each named format, storage bits, range, and the signal-to-quantization-noise ratio (SQNR, dB)
   of a 1024x1024 Gaussian weight, scaled per output channel (element formats) or per block (MX, NVFP4), and of a
   heavy-tailed (Student-t, 3 degrees of freedom) activation, scaled per tensor or per block.
2. The bundled digit models: 200 samples each from the U-Net and the DiT (DPM-Solver++ 2M, 20 steps, guidance 2),
   scored by class accuracy and FID against the held-out digits in the bundled classifier's feature space.
   Grids and results.json go to runs/demo/.
The quantize -> sample -> evaluate comparison joins when the quantization engine and the samplers land.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmq import formats  # noqa: E402
from dmq.formats import pack  # noqa: E402

NAMED = ["int8", "int6", "int4", "e5m2", "e4m3", "e3m2", "e2m3", "e2m1", "mxfp8", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
         "nvfp4"]


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - q).pow(2).sum()))


def fake_quant(fmt, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    if fmt.is_block:
        return fmt.quantize(x)
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = amax / fmt.max
    return fmt.quantize(x / scale) * scale


def formats_report() -> None:
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
        w_db, a_db = sqnr_db(weight, fake_quant(fmt, weight, True)), sqnr_db(act, fake_quant(fmt, act, False))
        print(f"{name:<12}{fmt.bits:>5}{bpe:>11.2f}{elem.max:>10g}{w_db:>13.1f}{a_db:>10.1f}{packed / 1024:>8.0f}")
    print("\nKiB/1M: packed element codes for one million values (block scales not included).")
    print("Run `make test` for the exactness tests and `python scripts/bench_formats.py` for throughput.")


def digits_report(out: Path, n: int = 200, steps: int = 20, guidance: float = 2.0) -> None:
    from diffusers import DPMSolverMultistepScheduler
    from torchvision.utils import save_image

    from pipelines import DigitClassifier, DigitsPipeline, load_digits
    from pipelines.evaluation import DigitsFeatures, class_accuracy, feature_stats, fid_from_stats

    assets = ROOT / "assets"
    clf = DigitClassifier.from_pretrained(assets / "digits-classifier").eval()
    feats = DigitsFeatures(clf)
    real = feature_stats(feats((load_digits("test")[0] + 1) / 2))
    out.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(n) % 10
    results = {}
    print(f"\nbundled digit models: {n} samples, DPM-Solver++ 2M, {steps} steps, guidance {guidance:g}\n")
    print(f"{'model':<14}{'class accuracy':>16}{'FID (digits)':>14}{'seconds':>9}")
    for name in ("digits-unet", "digits-dit"):
        pipe = DigitsPipeline.from_pretrained(assets / name)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.time()
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        images = pipe(labels, guidance_scale=guidance, num_inference_steps=steps, generator=gens,
                      output_type="pt").images
        seconds = time.time() - t0
        acc = class_accuracy(images, labels, clf)
        fid = fid_from_stats(*feature_stats(feats(images)), *real)
        results[name] = {"class_accuracy": acc, "fid_digits": fid, "seconds": seconds}
        save_image(images[:100], out / f"{name}-grid.png", nrow=10, padding=1, pad_value=1.0)
        print(f"{name:<14}{acc * 100:>15.1f}%{fid:>14.2f}{seconds:>9.1f}")
    cfg = {"num_samples": n, "steps": steps, "guidance": guidance, "sampler": "DPMSolverMultistepScheduler"}
    (out / "results.json").write_text(json.dumps({"config": cfg, "results": results}, indent=1))
    print(f"\ngrids and results.json in {out.relative_to(ROOT)}/")


def main() -> None:
    formats_report()
    digits_report(ROOT / "runs" / "demo")


if __name__ == "__main__":
    main()
