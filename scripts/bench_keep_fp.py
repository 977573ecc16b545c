"""What each structural group of layers costs in 16 bits, and what quantizing it costs in accuracy.

    .venv/bin/python scripts/bench_keep_fp.py --out benchmarks/quant_keep_fp.json

Backbones in BF16: the bundled U-Net and DiT (inputs and calibration from their own FP sampling trajectories, plus the
PSNR of final samples against the BF16 model's, same seeds) and tiny random-weight Flux, Wan, Qwen-Image, SD3 and Sana
replicas (random inputs across timesteps). Per preset:

- ``legacy``: the preset as it was: the 16-bit list of earlier releases (``dmq.config.LEGACY_KEEP_FP``), every other
  layer quantized alike, round-to-nearest;
- ``default``: the structure-derived default (``@first``/``@last`` in 16 bits; embedders and modulation, one token per
  sample, weight-only group-wise with GPTQ);
- one change of the default at a time: per-sample rounding by round-to-nearest or AdaRound, per-sample layers
  quantized like the rest, and each structural group kept in 16 bits (``+keep @group``) or first/last quantized.

Reported: ε SQNR against the BF16 model, whole-backbone bytes (every parameter and buffer, packed) against BF16, and
calibration time. The share of weights of each structural group is listed per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_quant as bq  # noqa: E402

import dmq  # noqa: E402
from dmq import structure  # noqa: E402
from dmq.config import LEGACY_KEEP_FP, TABLE_SPEC, _weight_only  # noqa: E402
from dmq.packed import weight_bytes  # noqa: E402

REPLICAS = ("flux", "wan", "qwen-image", "sd3", "sana", "dit-xl")


def table_variants(base: dmq.QuantConfig, model: torch.nn.Module) -> dict[str, dmq.QuantConfig]:
    """The embedding tables (``nn.Embedding``: class / label embedders) against the default (``"auto"``: INT8
    group-wise under 8-bit weights, else 16 bits): in 16 bits, in INT8 group-wise (``dmq.config.TABLE_SPEC``), or
    at the preset's own weight format group-wise (4 bits for the W4 presets). Where the default keeps the tables
    with the embedders under 2% of the model, they are quantized at the weight format instead."""
    tables = list(structure.tables(model))
    if not tables:
        return {}
    own = base.replace(embedding=_weight_only(base.weight))
    kept = structure.expand_patterns(model, base.keep_fp, {**structure.classify(model), **structure.tables(model)})
    if set(tables) & set(kept):
        return {"tables weight format": own.replace(keep_fp=tuple(n for n in kept if n not in tables))}
    out = {}
    if base.embedding_spec is not None:
        out["tables 16-bit"] = base.replace(embedding=None)
    if base.embedding_spec != TABLE_SPEC:
        out["tables int8"] = base.replace(embedding=TABLE_SPEC)
    if own.embedding_spec not in (base.embedding_spec, TABLE_SPEC):
        out["tables weight format"] = own
    return out


def variants(preset: str, model: torch.nn.Module | None = None) -> dict[str, dmq.QuantConfig]:
    base = dmq.get_config(preset)
    return {**({} if model is None else table_variants(base, model)),
        # the preset as it was before: legacy 16-bit list, per-sample layers like the rest, round-to-nearest
        "legacy": base.replace(keep_fp=LEGACY_KEEP_FP, per_sample=None, rounding="rtn"),
        "default": base,
        "per-sample rtn": base.replace(per_sample_rounding="rtn"),
        "per-sample adaround": base.replace(per_sample_rounding="adaround", rounding_iters=200),
        "per-sample as body": base.replace(per_sample=None),
        "body rtn": base.replace(rounding="rtn"),
        "body gptq": base.replace(rounding="gptq"),
        "+keep @embedder": base.replace(keep_fp=base.keep_fp + ("@embedder",)),
        "+keep @modulation": base.replace(keep_fp=base.keep_fp + ("@modulation",)),
        "+keep @context": base.replace(keep_fp=base.keep_fp + ("@context",)),
        "first/last quantized": base.replace(keep_fp=()),
    }


def bf16_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * 2 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())


def sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    s = sum(float(r.double().pow(2).sum()) for r in ref)
    e = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out))
    return 10 * torch.log10(torch.tensor(s / max(e, 1e-30))).item()


class Bundled:
    """A bundled digits model in BF16: ε on captured trajectory inputs, calibration by sampling, final samples."""

    def __init__(self, kind: str, calls: int):
        self.pipe = bq.load_pipe(kind)
        self.pipe.backbone.to(torch.bfloat16)
        self.fp_model = self.pipe.backbone
        self.inputs = bq.capture_inputs(self.pipe, torch.arange(10), 20, keep=calls, rows=20)
        self.ref = self.eps(self.fp_model)
        self.labels = torch.arange(8) % 10
        self.ref_samples = bq.sample(self.pipe, self.labels, 10, seed=30_000)

    def eps(self, model):
        return bq.eps_outputs(model, self.inputs)

    def calib_loop(self, model):
        bq.set_backbone(self.pipe, model)
        try:
            bq.sample(self.pipe, torch.arange(10) % 10, 10, seed=20_000)
        finally:
            bq.set_backbone(self.pipe, self.fp_model)

    def psnr(self, model) -> float:
        bq.set_backbone(self.pipe, model)
        try:
            out = bq.sample(self.pipe, self.labels, 10, seed=30_000)
        finally:
            bq.set_backbone(self.pipe, self.fp_model)
        mse = float((out.double() - self.ref_samples.double()).pow(2).mean())
        return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-30))).item()  # images in [0, 1]


class Replica:
    """A tiny random-weight backbone in BF16: ε on random inputs at spread timesteps, calibration on others."""

    def __init__(self, family: str, calls: int):
        from tests.dmq import tiny_backbones as tb

        self.tb, self.family = tb, family
        self.fp_model = tb.build(family).to(torch.bfloat16)
        self.eval_in = [self._cast(tb.inputs(family, 2, seed=i)) for i in range(calls)]
        self.cal_in = [self._cast(tb.inputs(family, 2, seed=1000 + i)) for i in range(calls)]
        self.ref = self.eps(self.fp_model)

    @staticmethod
    def _cast(kw: dict) -> dict:
        return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k not in
                ("timestep", "guidance") and not k.endswith("_ids") else v for k, v in kw.items()}

    @torch.no_grad()
    def eps(self, model):
        return [self.tb.output(model, kw) for kw in self.eval_in]

    def calib_loop(self, model):
        for kw in self.cal_in:
            self.tb.output(model, kw)


class ScaleDiT(Replica):
    """One full-width DiT-XL/2 block (``scripts/bench_scale.py``, random weights) in BF16: ε on random inputs
    (16 tokens, random class labels) at spread timesteps, calibration on others."""

    def __init__(self, family: str, calls: int):
        import bench_scale as bs

        self.bs = bs
        self.fp_model = bs.build("dit-xl-2", 1 / 28)
        self.eval_in = [bs.inputs("dit-xl-2", 200 + i, 4) for i in range(calls)]
        self.cal_in = [bs.inputs("dit-xl-2", 100 + i, 4) for i in range(calls)]
        self.ref = self.eps(self.fp_model)

    @torch.no_grad()
    def eps(self, model):
        return [self.bs.output(model, kw).float() for kw in self.eval_in]

    def calib_loop(self, model):
        for kw in self.cal_in:
            self.bs.output(model, kw)


def run(case, cfg: dmq.QuantConfig, psnr: bool) -> dict:
    model = dmq.quantize(case.fp_model, cfg, inplace=False)
    t0, c0 = time.perf_counter(), time.process_time()
    dmq.calibrate(model, case.calib_loop)
    calib_s, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
    dmq.freeze(model)
    res = {"sqnr_db": sqnr(case.ref, case.eps(model)), "calibrate_s": round(calib_s, 2),
           "calibrate_cpu_s": round(calib_cpu, 2),
           "bytes_vs_bf16": weight_bytes(model)["total_bytes"] / bf16_bytes(case.fp_model)}
    if psnr:
        res["sample_psnr_db"] = case.psnr(model)
    return res


def group_shares(model: torch.nn.Module) -> dict[str, float]:
    roles = structure.classify(model)
    total = sum(p.numel() for p in model.parameters())
    out = dict.fromkeys(structure.ROLES, 0)
    for n, r in roles.items():
        out[r] += model.get_submodule(n).weight.numel()
    return {r: v / total for r, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["unet", "dit", *REPLICAS], choices=["unet", "dit", *REPLICAS])
    ap.add_argument("--presets", nargs="+", default=["w4a16", "w4a8", "nvfp4", "w8a8"])
    ap.add_argument("--replica-presets", nargs="+", default=["w4a16", "nvfp4", "w8a8"])
    ap.add_argument("--variants", nargs="+", default=None, help="subset of the variants (default: all)")
    ap.add_argument("--calls", type=int, default=8, help="backbone calls whose ε is compared")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quant_keep_fp.json"))
    ap.add_argument("--skip-legacy", action="store_true", help="leave out the legacy row")
    ap.add_argument("--append", action="store_true", help="keep the other models already in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="keep_fp / exclude pattern")  # the legacy list names every family
    out = Path(args.out)
    command = " ".join(["python scripts/bench_keep_fp.py", *sys.argv[1:]])
    report = {"command": command, "protocol": vars(args), "models": {}}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        report["models"] = old["models"]
        report["command"] = old["command"] + "; " + command
    t0 = time.perf_counter()
    for kind in args.models:
        bundled = kind in ("unet", "dit")
        case = Bundled(kind, args.calls) if bundled else (ScaleDiT if kind == "dit-xl" else Replica)(kind, args.calls)
        entry = {"dtype": "bfloat16", "params": sum(p.numel() for p in case.fp_model.parameters()),
                 "group_share": group_shares(case.fp_model), "presets": {}}
        for preset in (args.presets if bundled else args.replica_presets):
            rows = {}
            for name, cfg in variants(preset, case.fp_model).items():
                if name != "default" and cfg == variants(preset)["default"]:
                    continue  # the default already is this variant
                if args.variants and name not in args.variants and name not in ("legacy", "default"):
                    continue
                if args.skip_legacy and name == "legacy":
                    continue
                psnr = bundled and (name in ("legacy", "default") or name.startswith("tables"))
                rows[name] = run(case, cfg, psnr=psnr)
                print(f"[{kind}] {preset} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()),
                      flush=True)
            entry["presets"][preset] = rows
            report["models"][kind] = entry
            report["seconds"] = round(time.perf_counter() - t0, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))  # after every preset


if __name__ == "__main__":
    main()
