"""`make demo`: a report on every named number format, on weight-like and activation-like data.

For each format: storage bits, range, and the signal-to-quantization-noise ratio (SQNR, dB) of
 - a 1024x1024 Gaussian weight, scaled per output channel (element formats) or per block (MX, NVFP4);
 - a heavy-tailed (Student-t, 3 degrees of freedom) activation, scaled per tensor (element formats) or per block.
The full quantize -> sample -> evaluate demo arrives with the quantization engine and the samplers.
"""

from __future__ import annotations

import torch

from dmq import formats
from dmq.formats import pack

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


def main() -> None:
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


if __name__ == "__main__":
    main()
