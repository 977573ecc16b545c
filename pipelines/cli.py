"""The ``dmq`` command: ``quantize``, ``sample``, ``search``, ``eval fid|clip`` and ``info`` (docs/cli.md).

Each subcommand turns its arguments into calls of library functions and prints what they return. The functions in
the "seams" block below are the one place where a subcommand names the library, so that moving a subcommand to a
new library function is a one-line change there.

Exit codes: 0 done; 1 unexpected failure inside the library; 2 bad command line or input (the message names the
argument, the value and what is allowed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import diffusers
import torch

import dmq
from pipelines import eval_clip, eval_fid
from pipelines.describe import describe_pipeline, quantization_report
from pipelines.distributed import iter_samples, load_pipeline, set_sampler
from pipelines.evaluation import save_grid
from pipelines.pipeline_folder import save_scheduler
from pipelines.quantize import quantize_pipeline
from pipelines.sampler_swap import sampler_names
from pipelines.schedule_search import fit_sampler
from pipelines.serialization import save_quantized
from samplers.coefficient_fit import REFINE_OPTIMIZERS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# errors that mean "fix your input": shown as one line with exit code 2
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)

# ------------------------------------------------------------------------------------------------------- seams
# The library call behind each subcommand. The diffusers-backend save format and the sampler-schedule search are
# being built elsewhere; switching to them is a change of one line here.
save = save_quantized  # quantize: write the folder
describe = describe_pipeline  # info
report = quantization_report  # quantize: the summary line
samples = iter_samples  # sample: per-image seeds, batches, progress bar
EVAL_PROGRAMS = {"fid": eval_fid.main, "clip": eval_clip.main}  # eval: the scripts' own programs


def load(source: str, *, allow_hub: bool = False, **kwargs: Any) -> Any:
    """A pipeline from a folder (a quantized one included) or, with ``allow_hub``, a hub id."""
    if allow_hub and not Path(source).exists():
        try:
            return load_pipeline(source, allow_hub=True, **kwargs)
        except (OSError, ValueError) as e:  # offline, not an id, unknown or gated repo: the hub's message says which
            raise FileNotFoundError(f"{source!r} does not exist as a folder, and loading it as a hub id failed: "
                                    f"{e}") from e
    return load_pipeline(source, **kwargs)


def search(pipe: Any, labels: list[int], steps: int, guidance: float, **options: Any) -> dict[str, Any]:
    """Search the sampler's schedule, then DC-Solver's ratios on it, then fit its coefficients, for ``pipe``, and
    install the result on it."""
    found = fit_sampler(pipe, labels, steps, guidance, **{k: v for k, v in options.items() if v is not None})
    schedule, fit = found["schedule"], found["coefficients"]
    return {"timesteps": schedule.timesteps, "schedule_accepted": schedule.accepted, "reason": schedule.reason,
            "dc_ratios": found["ratios"], "losses": found["losses"],
            "coefficients_accepted": None if fit is None else fit.accepted,
            "coefficients_reason": None if fit is None else fit.reason}


# ------------------------------------------------------------------------------------------------ arguments
def parse_labels(text: str) -> list[int]:
    """``"0-9"``, ``"1,3,5"`` or ``"0-4,9"`` as a list of ints."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if last < first:
                raise ValueError
            labels += range(first, last + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a label list: write 0-9, 1,3,5 or 0-4,9") from None
    return labels


def int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0)


def fine_steps(text: str) -> int:
    """A fine DDIM solve needs two steps at least (the last one lands on σ = 0)."""
    return int_at_least(text, 2)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh staging folder next to ``out``; the result is moved into place only when it is complete."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists: choose another folder, or pass --overwrite to replace it")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _commit_out(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------- subcommands
def cmd_quantize(args: argparse.Namespace) -> int:
    dmq.get_config(args.preset)  # an unknown preset fails before anything is loaded
    if args.prompts is not None:
        prompts = eval_clip.read_prompts(args.prompts)
        if args.calib_samples is not None:
            prompts = prompts[:args.calib_samples]
        calib: dict[str, Any] = {"prompts": prompts, "batch_size": args.batch_size}
    else:
        n = args.calib_samples or len(args.labels)
        labels = [args.labels[i % len(args.labels)] for i in range(n)]
        calib = {"call_kwargs": [{"class_labels": labels[k:k + args.batch_size]}
                                 for k in range(0, n, args.batch_size)]}
    out = Path(args.out)
    staging = _prepare_out(out, args.overwrite)
    pipe = load(args.src, allow_hub=True, **({} if args.dtype == "float32" else {"torch_dtype": _dtype(args.dtype)}))
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    sampler = set_sampler(pipe, args.sampler)
    try:
        quantize_pipeline(pipe, args.preset, num_inference_steps=args.calib_steps, guidance_scale=args.guidance,
                          timestep_selection=args.timestep_selection, seed=args.seed,
                          text_encoders=args.text_encoders, progress=_progress(args), **calib)
        save(pipe, staging)
        _commit_out(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rec = pipe.dmq_calibration
    name = next(n for n in ("transformer", "unet") if getattr(pipe, n, None) is not None)
    backbone = getattr(pipe, name)
    r = report(backbone)
    print(f"wrote {out}: {r['preset']} on {name} ({type(backbone).__name__}), {r['layers']} layers "
          f"quantized, {len(r['full_precision_layers'])} kept in full precision; weights "
          f"{_mib(r['bytes']['total_bytes'])} (float32 {_mib(r['float32_bytes'])}); calibration {rec.calls} calls, "
          f"{rec.points} points at {len(rec.timesteps)} timesteps in {rec.seconds:.1f} s; sampler {sampler}")
    print(f"next: dmq sample {out} --steps 10 --out grid.png   |   dmq info {out}")
    return EXIT_OK


def _dtype(name: str) -> Any:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def cmd_sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {args.out!r}: expected an image file name ending in .png, .jpg or .webp")
    pipe = load(args.dir, allow_hub=True)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    sampler = set_sampler(pipe, None if args.sampler == "default" else args.sampler)
    if args.labels is not None:
        conditions, cond_arg = args.labels, "class_labels"
    else:
        conditions, cond_arg = [args.prompt] * args.num_images, "prompt"
    call: dict[str, Any] = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    seeds = [args.seed + i for i in range(len(conditions))]
    images = []
    for _, batch in samples(pipe, conditions, seeds, args.batch_size, cond_arg=cond_arg, progress=_progress(args),
                            **call):
        images += list(batch.cpu())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=args.nrow)
    print(f"wrote {out}: {len(images)} images, {sampler}, {args.steps} steps")
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    pipe = load(args.dir)
    pipe.set_progress_bar_config(disable=True)
    found = search(pipe, args.labels, args.steps, args.guidance, num_latents=args.num_latents,
                   fine_steps=args.reference_steps, iters=args.iterations, seed=args.seed, progress=_progress(args),
                   coefficients=not args.no_coefficients, refine_iters=args.refine_iters,
                   refine_optimizer=args.refine_optimizer)
    where = save_scheduler(pipe.scheduler, folder)
    ratios = ", ".join(f"{r:.4f}" for r in found["dc_ratios"])
    steps = ", ".join(f"{s:g}" for s in found["timesteps"])
    print(f"schedule for {args.steps} steps at guidance {args.guidance:g}: [{steps}] "
          f"({'searched' if found['schedule_accepted'] else 'default kept'}: {found['reason']})")
    print(f"DC-Solver ratios on it: [{ratios}]")
    if found["coefficients_accepted"] is not None:
        print("solver coefficients fitted on both: " + ("kept" if found["coefficients_accepted"] else
                                                       f"not kept ({found['coefficients_reason']})"))
    print(f"wrote {where / 'scheduler_config.json'}: {folder} now samples with {type(pipe.scheduler).__name__}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    return EVAL_PROGRAMS[args.kind](args.rest, prog=f"dmq eval {args.kind}")


def cmd_info(args: argparse.Namespace) -> int:
    info = describe(Path(args.dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{info['folder']}: {info['pipeline']}, {_mib(info['disk_bytes'])} on disk")
    for name, comp in info["components"].items():
        print(f"  {name:<14} {comp['class']:<40} {_mib(comp['disk_bytes']):>12}")
    q = info["quantized"]
    if q is None:
        print("quantized: no (a full-precision folder)")
    else:
        print(f"quantized: {q['backbone']} ({q['backbone_class']}), preset {q['preset']}, {q['layers']} layers, "
              f"{q['attention_matmuls']} attention modules with quantized matmuls")
        print("  weights: " + "; ".join(f"{k} x{v}" for k, v in q["weights"].items()))
        print("  inputs:  " + "; ".join(f"{k} x{v}" for k, v in q["inputs"].items()))
        kept = q["full_precision_layers"]
        names = ", ".join(kept[:6]) + (", ..." if len(kept) > 6 else "")
        print(f"  kept in full precision: {len(kept)} layers" + (f" ({names})" if kept else ""))
        b = q["bytes"]
        print(f"  size: {_mib(b['total_bytes'])} resident ({q['parameters']:,} parameters, float32 "
              f"{_mib(q['float32_bytes'])}); quantized layers {b['bytes_per_param']:.3f} bytes per parameter")
        cal = q["calibration"]
        if cal:
            print(f"  calibration: {cal['calls']} calls, {cal['points']} points, {len(cal['timesteps'])} distinct "
                  f"timesteps, {cal['processes']} process(es), {cal['seconds']:.1f} s")
    s = info["sampler"]
    if s is not None:
        print("sampler: " + s["class"] + "".join(f", {k}={v}" for k, v in s.items() if k != "class"))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- parser
EXAMPLES = {
    "quantize": ["dmq quantize assets/digits-unet --preset w8a8 --labels 0-9 --calib-steps 10 --out runs/digits-w8a8",
                 "dmq quantize stable-diffusion-v1-5/stable-diffusion-v1-5 --preset w8a8 --prompts calib.txt "
                 "--calib-samples 64 --batch-size 8 --dtype float16 --device cuda --out runs/sd15-w8a8"],
    "sample": ["dmq sample runs/digits-w8a8 --labels 0-9 --sampler deis --steps 10 --out grid.png",
               "dmq sample runs/sd15-w8a8 --prompt 'an astronaut riding a horse' --num-images 4 --device cuda "
               "--out astronaut.png"],
    "search": ["dmq search runs/digits-w8a8 --steps 5 --guidance 2"],
    "eval": ["dmq eval fid runs/digits-w8a8 --sampler deis --steps 10 --num-samples 1000 --out runs/fid",
             "dmq eval clip --pipeline runs/sd15-w8a8 --prompts eval.txt --steps 25 --out runs/clip",
             "dmq eval fid --help    (every option of the evaluation)"],
    "info": ["dmq info runs/digits-w8a8", "dmq info runs/digits-w8a8 --json"],
}


def _epilog(name: str) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    common.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    common.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="dmq", formatter_class=fmt,
        description="Quantize diffusers pipelines with timestep-aware calibration, sample them with fast samplers, "
                    "and measure the result.",
        epilog="examples:\n" + "\n".join(f"  {EXAMPLES[k][0]}" for k in EXAMPLES)
               + "\n\n`dmq SUBCOMMAND --help` gives every option. Exit codes: 0 done, 1 failure, 2 bad input, "
                 "130 interrupted.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    samplers = ", ".join(sampler_names())

    q = sub.add_parser("quantize", parents=[common], formatter_class=fmt, epilog=_epilog("quantize"),
                       help="quantize a pipeline's backbone and write a loadable folder",
                       description="Quantize the backbone (U-Net or DiT) of a diffusers pipeline with timestep-aware "
                                   "calibration on class labels or prompts, and write the packed model to --out.")
    q.add_argument("src", metavar="SRC", help="a diffusers pipeline folder, or a hub id (needs internet)")
    q.add_argument("--preset", required=True, help="w8a8, w4a8, w4a16, w6a6, fp8, w4a8-fp, w4a6-fp, mxfp4, nvfp4; "
                                                   "methods compose: w4a8+gptq")
    cond = q.add_mutually_exclusive_group(required=True)
    cond.add_argument("--labels", type=parse_labels, help="class labels to calibrate on: 0-9, 1,3,5, 0-4,9")
    cond.add_argument("--prompts", help="text file with one calibration prompt per line")
    q.add_argument("--calib-samples", type=positive_int, default=None,
                   help="calibration images (labels cycle; prompts are cut); default: labels once, every prompt")
    q.add_argument("--calib-steps", type=positive_int, default=25, help="sampler steps of each calibration run")
    q.add_argument("--batch-size", type=positive_int, default=8, help="images per calibration call")
    q.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    q.add_argument("--sampler", default=None, help=f"sampler to calibrate and save with: {samplers}")
    q.add_argument("--timestep-selection", choices=("all", "uniform", "normal"), default=None,
                   help="which backbone calls calibrate (default all)")
    q.add_argument("--text-encoders", default=None, help="also quantize text encoder weights: w8a16 or w4a16")
    q.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    q.add_argument("--seed", type=int, default=0, help="calibration call i uses seed + i")
    q.add_argument("--out", required=True, help="the folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(run=cmd_quantize)

    s = sub.add_parser("sample", parents=[common], formatter_class=fmt, epilog=_epilog("sample"),
                       help="sample a pipeline folder into an image grid",
                       description="Sample a pipeline folder (quantized or not) and write one grid of all images. "
                                   "Image i uses seed --seed + i.")
    s.add_argument("dir", metavar="DIR", help="a pipeline folder (dmq quantize output or any diffusers folder)")
    cond = s.add_mutually_exclusive_group(required=True)
    cond.add_argument("--labels", type=parse_labels, help="one image per class label: 0-9")
    cond.add_argument("--prompt", help="a text prompt (text-to-image pipelines)")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--num-images", type=positive_int, default=4, help="--prompt: images of the prompt")
    s.add_argument("--sampler", default="default", help=f"{samplers}, or default (the folder's own)")
    s.add_argument("--steps", type=positive_int, default=10, help="sampler steps")
    s.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call")
    s.add_argument("--nrow", type=positive_int, default=10, help="images per grid row")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True, help="the image to write (.png, .jpg, .webp)")
    s.set_defaults(run=cmd_sample)

    r = sub.add_parser("search", parents=[common], formatter_class=fmt, epilog=_epilog("search"),
                       help="search DC-Solver's schedule and ratios, fit its coefficients, and save them as "
                            "the folder's sampler",
                       description="Search DC-Solver's schedule and compensation ratios for the folder's backbone "
                                   "at --steps steps against a fine DDIM run from the same noise, fit the "
                                   "solver's coefficients on them, and write all three into the folder's "
                                   "scheduler config. Class-conditional pipelines.")
    r.add_argument("dir", metavar="DIR", help="a pipeline folder; its scheduler config is rewritten")
    r.add_argument("--steps", type=positive_int, default=5, help="the step count to search for")
    r.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the search")
    r.add_argument("--labels", type=parse_labels, default=list(range(10)), help="labels of the search latents")
    r.add_argument("--num-latents", type=positive_int, default=None, help="search latents (default one per label)")
    r.add_argument("--iterations", type=positive_int, default=20, help="optimisation steps per ratio")
    r.add_argument("--reference-steps", type=fine_steps, default=250, help="steps of the DDIM reference (>= 2)")
    r.add_argument("--seed", type=int, default=0, help="seed of the search latents")
    r.add_argument("--no-coefficients", action="store_true",
                   help="keep the solver's own coefficients (default: fit them on the schedule and ratios)")
    r.add_argument("--refine-iters", type=non_negative_int, default=0,
                   help="iterations refining the fitted coefficients as a whole through the model, kept only if the "
                        "held-out latents agree (default 0: none)")
    r.add_argument("--refine-optimizer", choices=REFINE_OPTIMIZERS, default="lbfgs",
                   help="the refinement's optimiser: lbfgs, or adam for a quantized backbone (its rounding stalls "
                        "the L-BFGS line search)")
    r.set_defaults(run=cmd_search)

    e = sub.add_parser("eval", formatter_class=fmt, epilog=_epilog("eval"),
                       help="FID (fid) or CLIP score (clip) of a pipeline's samples",
                       description="The same programs as scripts/eval_fid.py and scripts/eval_clip.py; "
                                   "`dmq eval fid --help` and `dmq eval clip --help` list their options.")
    e.add_argument("kind", choices=("fid", "clip"))
    e.add_argument("rest", nargs=argparse.REMAINDER, help="the evaluation's own options")
    e.set_defaults(run=cmd_eval, debug=False, verbose=False, no_progress=False)

    i = sub.add_parser("info", parents=[common], formatter_class=fmt, epilog=_epilog("info"),
                       help="what a pipeline folder holds",
                       description="Print what a pipeline folder holds: components and sizes, the quantized layers "
                                   "and their formats, the calibration record, and the sampler.")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.no_progress:
        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" and the like
    prog = f"dmq {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USAGE_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - one line for the shell user, the traceback under --debug
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: failed: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
