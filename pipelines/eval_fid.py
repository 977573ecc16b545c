"""FID (and, for the digit models, class accuracy) of a class-conditional pipeline's samples.

    dmq eval fid runs/digits-w8a8 --sampler deis --steps 10 --num-samples 1000 --out runs/fid-w8a8
    python scripts/eval_fid.py --num-samples 2000 --nfe 20 --scheduler DDIMScheduler --out runs/fid-unet-ddim20
    torchrun --nproc_per_node 2 scripts/eval_fid.py --pipeline assets/digits-dit --num-samples 2000 --out runs/dit
    dmq eval fid PATH --features inception --inception-weights weights-inception.pth \
        --reference ref-stats.npz --num-classes 1000 --out runs/x

``dmq eval fid`` and ``scripts/eval_fid.py`` (kept for ``torchrun`` / ``accelerate launch``) both run :func:`main`.

Sample ``i`` has label ``i % num_classes`` and seed ``seed + i``, so the numbers do not depend on the batch size or
on the number of processes (under torchrun each rank generates a contiguous share; only rank 0 writes files).
Writes ``OUT/results.json`` and ``OUT/grid.png`` (the first up to 100 samples, one row per 10).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.digits_pipeline import DigitsPipeline
from pipelines.distributed import (
    DMQ_SAMPLERS,
    QUANT_PRESETS,
    apply_quant_preset,
    check_sampler_name,
    distributed_state,
    gather_indexed,
    iter_samples,
    load_pipeline,
    set_sampler,
)
from pipelines.evaluation import (
    DigitsFeatures,
    InceptionFeatures,
    add_reference,
    class_predictions,
    compute_fid,
    make_fid,
    require_torch_fidelity,
    save_grid,
)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent

DEFAULT_PIPELINE = REPO / "assets" / "digits-unet"
DEFAULT_CLASSIFIER = REPO / "assets" / "digits-classifier"
FEATURES = ("digits", "inception")
GRID_MAX = 100


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=example_text(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pipeline_dir", nargs="?", default=None, metavar="DIR",
                   help="a pipeline folder: a dmq quantize output or any save_pretrained folder (same as --pipeline)")
    p.add_argument("--pipeline", default=None, help=f"a save_pretrained pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--scheduler", "--sampler", default=None,
                   help="diffusers scheduler class (DDIMScheduler, DPMSolverMultistepScheduler, "
                        "UniPCMultistepScheduler, ...), built from_config; default: the pipeline's own. "
                        f"{DMQ_SAMPLERS} are reserved for dmq's samplers")
    p.add_argument("--quant", default="none", help=f"quantization preset, one of {', '.join(QUANT_PRESETS)}")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="--quant: calibration images (labels cycle like the samples, other seeds)")
    p.add_argument("--calib-nfe", type=int, default=None, help="--quant: calibration sampler steps (default --nfe)")
    p.add_argument("--nfe", "--steps", type=int, default=50, help="sampler steps (num_inference_steps)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--num-samples", type=int, default=1000, help="N generated samples (N >= 2)")
    p.add_argument("--num-classes", type=int, default=10, help="labels cycle 0..num_classes-1")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--features", default="digits", choices=FEATURES, help="FID feature network")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file (else downloaded)")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="digit classifier folder")
    p.add_argument("--reference", default="digits-test", help="'digits-test', an image folder or an .npz (mu, sigma)")
    p.add_argument("--out", default="runs/eval_fid", help="output folder for results.json and grid.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def example_text() -> str:
    return "examples:\n" + "\n".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines())


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values before anything is loaded; resolves the pipeline folder."""
    if args.pipeline_dir is not None and args.pipeline is not None and args.pipeline_dir != args.pipeline:
        raise ValueError(f"got the pipeline twice: DIR {args.pipeline_dir!r} and --pipeline {args.pipeline!r}")
    args.pipeline = args.pipeline_dir or args.pipeline or str(DEFAULT_PIPELINE)
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 for FID, got N={args.num_samples}")
    for name in ("nfe", "batch_size", "num_classes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.scheduler not in (None, "default"):
        check_sampler_name(args.scheduler)  # raises for unknown names and dmq's samplers not available yet
    apply_quant_preset(None, args.quant)  # raises for unknown presets
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.calib_nfe is not None and args.calib_nfe < 1:
        raise ValueError(f"--calib-nfe must be >= 1 (or left out for --nfe), got {args.calib_nfe}")
    if args.inception_weights is not None:
        if args.features != "inception":
            raise ValueError("--inception-weights needs --features inception")
        if not Path(args.inception_weights).is_file():
            InceptionFeatures(args.inception_weights)  # raises FileNotFoundError naming the file and its source
    if args.features == "inception":
        require_torch_fidelity()


def feature_network(args: argparse.Namespace) -> nn.Module:
    if args.features == "digits":
        return DigitsFeatures.from_pretrained(args.classifier)
    return InceptionFeatures(args.inception_weights)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate; returns the results on the main process (None elsewhere)."""
    start = time.perf_counter()
    state = distributed_state()
    pipe = load_pipeline(args.pipeline).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    sampler = set_sampler(pipe, args.scheduler)
    calib = [i % args.num_classes for i in range(args.calib_samples)]
    apply_quant_preset(pipe, args.quant, call_kwargs=[{"class_labels": calib[k:k + args.batch_size]}
                                                      for k in range(0, len(calib), args.batch_size)],
                       num_inference_steps=args.nfe if args.calib_nfe is None else args.calib_nfe,
                       guidance_scale=args.guidance,
                       progress=not args.no_progress)
    digits = isinstance(pipe, DigitsPipeline)

    feature = feature_network(args).to(state.device)
    metric = make_fid(feature, state.device)
    n_ref = add_reference(metric, args.reference, args.batch_size, state)
    classifier = None
    if digits or args.features == "digits":
        classifier = feature.classifier if args.features == "digits" else \
            DigitsFeatures.from_pretrained(args.classifier).classifier.to(state.device)

    n = args.num_samples
    labels = [i % args.num_classes for i in range(n)]
    seeds = [args.seed + i for i in range(n)]
    mine: list[int] = []
    correct: list[bool] = []
    grid: list[torch.Tensor] = []
    gen_start = time.perf_counter()
    for idx, images in iter_samples(pipe, labels, seeds, args.batch_size, state=state, progress=not args.no_progress,
                                    guidance_scale=args.guidance, num_inference_steps=args.nfe):
        metric.update(images, real=False)
        if classifier is not None:
            correct += (class_predictions(images, classifier) == torch.tensor([labels[i] for i in idx])).tolist()
        grid += [images[k].cpu() for k, i in enumerate(idx) if i < GRID_MAX]
        mine += idx
    gen_time = time.perf_counter() - gen_start
    logger.info("rank %d generated %d samples in %.1f s", state.process_index, len(mine), gen_time)

    fid = compute_fid(metric)
    accuracy = None
    if classifier is not None:
        flags = gather_indexed(mine, correct, state)
        accuracy = sum(flags) / len(flags)
    grid_images = gather_indexed([i for i in mine if i < GRID_MAX], grid, state)
    per_rank = gather_indexed([state.process_index], [len(mine)], state)
    gen_times = gather_indexed([state.process_index], [gen_time], state)
    if not state.is_main_process:
        return None

    backbone = getattr(pipe, "backbone", None) or getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    results = {
        "model": str(args.pipeline),
        "pipeline": type(pipe).__name__,
        "backbone": type(backbone).__name__ if backbone is not None else None,
        "sampler": sampler,
        "nfe": args.nfe,
        "guidance": args.guidance,
        "preset": args.quant,
        "num_samples": n,
        "num_classes": args.num_classes,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "feature_extractor": args.features,
        "inception_weights": args.inception_weights,
        "reference": args.reference,
        "reference_num_samples": n_ref,
        "fid": fid,
        "class_accuracy": accuracy,
        "classifier": str(args.classifier) if classifier is not None else None,
        "world_size": state.num_processes,
        "samples_per_rank": per_rank,
        "generation_time_s": max(gen_times),
        "wall_time_s": time.perf_counter() - start,
        "device": str(state.device),
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    save_grid(grid_images, out / "grid.png", nrow=10)
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err))
    state = distributed_state()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [rank {state.process_index}/{state.num_processes}] %(name)s: %(message)s")
    results = run(args)
    if results is not None:
        acc = results["class_accuracy"]
        print(f"FID {results['fid']:.4f} (N={results['num_samples']}, {results['feature_extractor']} features, "
              f"reference {results['reference']})" + (f", class accuracy {acc:.4f}" if acc is not None else "")
              + f"; wrote {Path(args.out) / 'results.json'}")
    state.wait_for_everyone()
    state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
