"""CLIP score of a text-to-image pipeline over a prompts file (one prompt per line; blank lines are skipped).

    dmq eval clip --pipeline PATH --prompts prompts.txt --clip ViT-B/32 --steps 25 --out runs/clip
    python scripts/eval_clip.py --pipeline PATH --prompts prompts.txt --clip ViT-B/32 --nfe 25 --out runs/clip
    torchrun --nproc_per_node 2 scripts/eval_clip.py --pipeline PATH --prompts prompts.txt --clip clip.pt --out runs/c

Prompt ``i`` is sampled with seed ``seed + i``; under torchrun each rank takes a contiguous share of the prompts and
scores its own images, and only rank 0 writes ``OUT/results.json`` and ``OUT/grid.png``. ``--clip`` is a
clip-anytorch model name (downloaded to ``~/.cache/clip`` on first use) or a local checkpoint file.
``dmq eval clip`` and ``scripts/eval_clip.py`` (kept for ``torchrun`` / ``accelerate launch``) both run :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
from pipelines.evaluation import check_clip_name, clip_scores, load_clip, save_grid

logger = logging.getLogger(__name__)

GRID_MAX = 100
THUMB = 128  # grid thumbnails are at most this many pixels on a side


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    examples = "examples:\n" + "\n".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines())
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=examples,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pipeline", required=True, help="a text-to-image pipeline folder (or hub id)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--clip", default="ViT-B/32", help="clip-anytorch model name or local checkpoint file")
    p.add_argument("--scheduler", "--sampler", default=None,
                   help=f"diffusers scheduler class name, built from_config; {DMQ_SAMPLERS} are reserved for dmq")
    p.add_argument("--quant", default="none", help=f"quantization preset, one of {', '.join(QUANT_PRESETS)}")
    p.add_argument("--calib-prompts", default=None,
                   help="--quant: calibration prompts file (default: the first --calib-samples of --prompts)")
    p.add_argument("--calib-samples", type=int, default=16, help="--quant: number of calibration prompts")
    p.add_argument("--calib-nfe", type=int, default=None, help="--quant: calibration sampler steps (default --nfe)")
    p.add_argument("--nfe", "--steps", type=int, default=25, help="sampler steps (num_inference_steps)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="runs/eval_clip", help="output folder for results.json and grid.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of ``path``, stripped; an error if there are none."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no prompts: write one prompt per line")
    return prompts


def check_args(args: argparse.Namespace) -> list[str]:
    """Reject bad values before any model is loaded; returns the prompts."""
    for name in ("nfe", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.scheduler not in (None, "default"):
        check_sampler_name(args.scheduler)  # raises for unknown names and dmq's samplers not available yet
    apply_quant_preset(None, args.quant)
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.calib_nfe is not None and args.calib_nfe < 1:
        raise ValueError(f"--calib-nfe must be >= 1 (or left out for --nfe), got {args.calib_nfe}")
    if args.calib_prompts is not None:
        read_prompts(args.calib_prompts)
    check_clip_name(args.clip)
    return read_prompts(args.prompts)


def score_images(
    images: torch.Tensor | Sequence[Any], prompts: Sequence[str], clip_name_or_path: str,
    device: str | torch.device = "cpu", batch_size: int = 64,
) -> torch.Tensor:
    """Per-image CLIP scores ``100 * max(cos, 0)`` of images (float ``(N, C, H, W)`` in [0, 1] or PIL) vs prompts."""
    model, preprocess = load_clip(clip_name_or_path, device)
    return clip_scores(images, prompts, model, preprocess, batch_size)


def thumbnail(image: torch.Tensor, size: int = THUMB) -> torch.Tensor:
    scale = size / max(image.shape[-2:])
    if scale >= 1:
        return image
    hw = (max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale)))
    return F.interpolate(image[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def run(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any] | None:
    """Generate and score; returns the results on the main process (None elsewhere)."""
    start = time.perf_counter()
    state = distributed_state()
    pipe = load_pipeline(args.pipeline, allow_hub=True).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    sampler = set_sampler(pipe, args.scheduler)
    if args.quant != "none":
        calib = read_prompts(args.calib_prompts) if args.calib_prompts else prompts
        apply_quant_preset(pipe, args.quant, prompts=calib[:args.calib_samples],
                           num_inference_steps=args.nfe if args.calib_nfe is None else args.calib_nfe,
                           guidance_scale=args.guidance,
                           progress=not args.no_progress)
    model, preprocess = load_clip(args.clip, state.device)

    call = {"num_inference_steps": args.nfe, "guidance_scale": args.guidance}
    call.update({k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None})
    seeds = [args.seed + i for i in range(len(prompts))]
    mine: list[int] = []
    scores: list[float] = []
    grid: list[torch.Tensor] = []
    for idx, images in iter_samples(pipe, prompts, seeds, args.batch_size, cond_arg="prompt", state=state,
                                    progress=not args.no_progress, **call):
        scores += clip_scores(images, [prompts[i] for i in idx], model, preprocess).tolist()
        grid += [thumbnail(images[k].cpu()) for k, i in enumerate(idx) if i < GRID_MAX]
        mine += idx
    all_scores = gather_indexed(mine, scores, state)
    grid_images = gather_indexed([i for i in mine if i < GRID_MAX], grid, state)
    per_rank = gather_indexed([state.process_index], [len(mine)], state)
    if not state.is_main_process:
        return None
    results = {
        "model": str(args.pipeline),
        "pipeline": type(pipe).__name__,
        "sampler": sampler,
        "nfe": args.nfe,
        "guidance": args.guidance,
        "preset": args.quant,
        "num_prompts": len(prompts),
        "prompts_file": str(args.prompts),
        "clip_model": args.clip,
        "seed": args.seed,
        "clip_score": sum(all_scores) / len(all_scores),
        "scores": all_scores,
        "world_size": state.num_processes,
        "samples_per_rank": per_rank,
        "wall_time_s": time.perf_counter() - start,
        "device": str(state.device),
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if len({tuple(g.shape) for g in grid_images}) == 1:
        save_grid(grid_images, out / "grid.png", nrow=10)
    else:
        logger.warning("images of different sizes: no grid.png written")
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        prompts = check_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    state = distributed_state()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [rank {state.process_index}/{state.num_processes}] %(name)s: %(message)s")
    results = run(args, prompts)
    if results is not None:
        print(f"CLIP score {results['clip_score']:.3f} over {results['num_prompts']} prompts "
              f"({results['clip_model']}); wrote {Path(args.out) / 'results.json'}")
    state.wait_for_everyone()
    state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
