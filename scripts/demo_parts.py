"""The demo's helpers (sampling the bundled models, image grids) and its newer parts, driven by scripts/demo.py:

* :func:`lora_part`: a LoRA fine-tuned on the float bundled model (bold digits), loaded onto the W4-quantized model;
  its effect there against its effect on the float model, fuse/unfuse, latency.
* :func:`schedule_part`: a searched DEIS (or DC-Solver) schedule at a small NFE against the default grid, both
  against the fine full-precision reference.
* :func:`flux_part`: a random-weight Flux replica quantized W8A8 / W4A8 and sampled with DEIS and DC-Solver; SQNR
  against full precision.

The library does the work (``pipelines.lora``, ``pipelines.search_schedule`` / ``fit_sampler``,
``pipelines.flux_replica``, ``pipelines.quantize_pipeline``); these functions drive it and return JSON-ready dicts.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines import DigitsPipeline, load_digits, quantize_pipeline, use_sampler
from pipelines.evaluation import class_accuracy, psnr

ROOT = Path(__file__).resolve().parent.parent
CALIB_SEED = 1_000_000  # calibration runs: other noise than the evaluation (seed + i)
SEARCH_SEED = 2_000_000  # schedule-search latents
LORA_SEED = 3_000_000  # LoRA training batches


def load_pipeline(model: str) -> DigitsPipeline:
    pipe = DigitsPipeline.from_pretrained(str(ROOT / "assets" / f"digits-{model}"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: DigitsPipeline, n: int, nfe: int, guidance: float, seed: int) -> torch.Tensor:
    """``n`` images, label ``i % 10`` and seed ``seed + i`` (a sample does not depend on its batch)."""
    labels = torch.arange(n) % 10
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(labels, guidance_scale=guidance, num_inference_steps=nfe, generator=gens, output_type="pt").images


def set_sampler(pipe: DigitsPipeline, base: Any, name: str, options: dict) -> None:
    pipe.scheduler = base
    use_sampler(pipe, name, **options)


def calibrate(pipe: DigitsPipeline, preset: str, samples: int, nfe: int, guidance: float) -> float:
    """``quantize_pipeline`` with ``samples`` class-label calibration images (10 per call); returns seconds."""
    t0 = time.perf_counter()
    calib = torch.arange(samples) % 10
    quantize_pipeline(pipe, preset, call_kwargs=[{"class_labels": calib[k:k + 10].tolist()}
                                                 for k in range(0, len(calib), 10)],
                      num_inference_steps=nfe, guidance_scale=guidance, seed=CALIB_SEED, progress=False)
    return time.perf_counter() - t0


def draw_grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 2, columns: int = 10) -> None:
    """One labelled row per configuration, ``columns`` images ``(N, C, H, W)`` in [0, 1] per row (C 1 or 3)."""
    from PIL import Image, ImageDraw

    rgb = any(images.shape[1] == 3 for _, images in rows)
    tile = rows[0][1].shape[-1] * scale
    pad, label_w = 2, 190
    width = label_w + columns * (tile + pad)
    height = len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB" if rgb else "L", (width, height), (255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0) if rgb else 0)
        for c in range(min(columns, len(images))):
            arr = (images[c].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1
                                 else "RGB").convert("RGB" if rgb else "L").resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (label_w + c * (tile + pad), y))
    canvas.save(path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - x.double()).pow(2).sum()))


# ---------------------------------------------------------------------------------------------------- LoRA part


def bold(images: torch.Tensor) -> torch.Tensor:
    """The LoRA's target style: strokes thickened by a 3x3 grey-scale dilation (images in [-1, 1])."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def _probe_inputs(n: int = 20, seed: int = 5) -> dict:
    """Fixed backbone inputs for the ε comparisons: held-out digits noised at t = 100..900, labels 0-9."""
    from diffusers import DDPMScheduler

    x0, y = load_digits("test")
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(100, 900, n).round().long()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    xt = sched.add_noise(x0[:n], torch.randn(x0[:n].shape, generator=g), t)
    return {"x": xt, "t": t, "labels": y[:n]}


@torch.no_grad()
def _eps(backbone: torch.nn.Module, probe: dict) -> torch.Tensor:
    return backbone(probe["x"], probe["t"], class_labels=probe["labels"]).sample.float()


def lora_part(args: Any, out: Path, classifier: torch.nn.Module, progress: bool) -> dict:
    """Fine-tune a LoRA on the float model, load it onto the quantized one, and compare (module docstring)."""
    from pipelines import lora

    model, preset, nfe, n, g = args.lora_model, args.lora_preset, args.lora_nfe, args.lora_samples, args.guidance
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"] if model == "dit" else \
        ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    probe = _probe_inputs()
    labels = torch.arange(n) % 10
    fp, q = load_pipeline(model), load_pipeline(model)
    calib_s = calibrate(q, preset, args.calib_samples, args.calib_nfe, g)
    for pipe in (fp, q):
        use_sampler(pipe, args.lora_sampler)

    x, y = load_digits("train")
    target = bold(x)
    config = lora.add_lora(fp.backbone, rank=args.lora_rank, target_modules=targets)
    t0 = time.perf_counter()
    losses = lora.train_lora(fp, target, y, args.lora_steps, batch_size=64, lr=args.lora_lr, seed=LORA_SEED,
                        progress=progress)
    train_s = time.perf_counter() - t0
    lora.load_lora(q.backbone, lora.lora_state_dict(fp.backbone), config)

    images, eps = {}, {}
    for name, pipe in (("fp", fp), (preset, q)):
        for on in (False, True):
            lora.set_lora_enabled(pipe.backbone, on)
            key = f"{name}+lora" if on else name
            images[key] = sample(pipe, n, nfe, g, args.seed)
            eps[key] = _eps(pipe.backbone, probe)
    ink = {k: float(v.mean()) for k, v in images.items()}
    d_fp, d_q = images["fp+lora"] - images["fp"], images[f"{preset}+lora"] - images[preset]
    e_fp, e_q = eps["fp+lora"] - eps["fp"], eps[f"{preset}+lora"] - eps[preset]

    # fuse / unfuse: on the quantized model the delta goes to the 16-bit side branch, the packed codes stay
    fusion = {}
    for name, pipe in (("fp", fp), (preset, q)):
        unfused = eps[f"{name}+lora"]
        layers = lora.fuse_lora(pipe.backbone)
        fused = _eps(pipe.backbone, probe)
        fused_images = sample(pipe, n, nfe, g, args.seed) if name != "fp" else None
        lora.unfuse_lora(pipe.backbone)
        fusion[name] = {"layers": layers, "fused_vs_unfused_max_rel": float((fused - unfused).abs().max()
                                                                            / unfused.abs().max()),
                        "fused_vs_unfused_rel": _rel(fused, unfused),
                        "unfuse_restores_bits": bool(torch.equal(_eps(pipe.backbone, probe), unfused))}
        if fused_images is not None:
            fusion[name]["fused_images_psnr_vs_unfused"] = float(psnr(fused_images, images[f"{name}+lora"]))

    latency = _lora_latency(fp.backbone, q.backbone, preset, reps=args.lora_reps)
    draw_grid([("bold training digits (target)", (target[[int((y == c).nonzero()[0]) for c in range(10)]] + 1) / 2),
               ("FP", images["fp"][:10]), ("FP + LoRA", images["fp+lora"][:10]),
               (f"{preset}", images[preset][:10]), (f"{preset} + LoRA", images[f"{preset}+lora"][:10])],
              out / "grid-lora.png")
    return {
        "model": model, "preset": preset, "sampler": args.lora_sampler, "nfe": nfe, "num_samples": n,
        "rank": args.lora_rank, "targets": targets, "train_steps": args.lora_steps, "batch_size": 64,
        "lr": args.lora_lr, "train_seconds": train_s, "calibration_seconds": calib_s,
        "loss_first_10": statistics.fmean(losses[:10]), "loss_last_10": statistics.fmean(losses[-10:]),
        "lora_layers": fusion["fp"]["layers"],
        "ink": ink, "ink_data": {"digits": float(((x + 1) / 2).mean()), "bold": float(((target + 1) / 2).mean())},
        "class_accuracy": {k: class_accuracy(v, labels, classifier) for k, v in images.items()},
        "image_effect_rel_error": _rel(d_q, d_fp), "image_effect_cosine": _cos(d_q, d_fp),
        "eps_effect_rel_error": _rel(e_q, e_fp), "eps_effect_cosine": _cos(e_q, e_fp),
        "quantization_rel_error_eps": _rel(eps[preset], eps["fp"]),
        "fusion": fusion,
        "latency": latency,
    }


@torch.no_grad()
def _lora_latency(fp: torch.nn.Module, q: torch.nn.Module, preset: str, reps: int, batch: int = 20) -> dict:
    """Backbone forward on a CFG batch (2 x ``batch`` images), LoRA on and off, interleaved rounds, medians."""
    from pipelines.lora import set_lora_enabled

    g = torch.Generator().manual_seed(0)
    size = fp.config.sample_size
    x = torch.randn(2 * batch, fp.config.in_channels, size, size, generator=g)
    t = torch.full((2 * batch,), 500)
    labels = torch.cat([torch.arange(batch) % 10, torch.full((batch,), 10)])
    variants = [(name, m, on) for name, m in (("fp", fp), (preset, q)) for on in (False, True)]
    times: dict[str, list[float]] = {f"{n}+lora" if on else n: [] for n, _, on in variants}
    for r in range(reps + 1):  # round 0 warms up
        for name, m, on in variants:
            set_lora_enabled(m, on)
            t0 = time.perf_counter()
            m(x, t, class_labels=labels)
            if r:
                times[f"{name}+lora" if on else name].append(time.perf_counter() - t0)
    for m in (fp, q):
        set_lora_enabled(m, True)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"batch": 2 * batch, "reps": reps, "ms": ms,
            "quantized_lora_vs_fp_lora": ms[f"{preset}+lora"] / ms["fp+lora"],
            "lora_overhead_fp": ms["fp+lora"] / ms["fp"], "lora_overhead_quantized": ms[f"{preset}+lora"] / ms[preset]}


# ------------------------------------------------------------------------------------------------ schedule part


def schedule_part(args: Any, out: Path, refs: dict[str, torch.Tensor], dc_ratios: Any, progress: bool) -> dict:
    """Searched schedule against the default grid at ``--search-nfe`` on ``--search-model`` (module docstring).

    ``refs`` holds full-precision DPM-Solver++ references already sampled by the quantization part (same seeds);
    a missing one is sampled here.
    """
    from pipelines import fit_sampler, search_schedule

    model, nfe, n, g = args.search_model, args.search_nfe, args.num_samples, args.guidance
    pipe = load_pipeline(model)
    base = pipe.scheduler
    ref = refs.get(model)
    if ref is None or len(ref) != n:
        set_sampler(pipe, base, "dpm++", {})
        ref = sample(pipe, n, args.ref_nfe, g, args.seed)
    rows, grid, searches = [], [(f"FP, DPM-Solver++ {args.ref_nfe} (reference)", ref[:10])], {}
    for sampler in args.search_samplers:
        options = dc_ratios.get(model, pipe, nfe, g)[0] if sampler == "dc-solver" else {}
        set_sampler(pipe, base, sampler, options)
        default = sample(pipe, n, nfe, g, args.seed)
        set_sampler(pipe, base, sampler, {})
        t0 = time.perf_counter()
        if sampler == "dc-solver":  # the schedule (UniPC, ratios 1), the DC ratios on it, then the coefficients
            found = fit_sampler(pipe, list(range(10)), nfe, g, num_latents=args.search_latents, seed=SEARCH_SEED,
                                progress=progress)
            fit = found["coefficients"]
            result, extra = found["schedule"], {"ratios": found["ratios"], "coefficients_accepted": fit.accepted,
                                                "coefficients_reason": fit.reason,
                                                "fitted_timesteps": fit.timesteps if fit.accepted else None}
        else:
            result = search_schedule(pipe, list(range(10)), nfe, g, num_latents=args.search_latents,
                                     seed=SEARCH_SEED, progress=progress)
            extra = {}
        search_s = time.perf_counter() - t0
        searched = sample(pipe, n, nfe, g, args.seed)
        label = {"deis": "DEIS", "dc-solver": "DC-Solver"}[sampler]
        grid += [(f"{label} {nfe}, default grid", default[:10]), (f"{label} {nfe}, searched", searched[:10])]
        for kind, images in (("default", default), ("searched", searched)):
            rows.append({"sampler": sampler, "schedule": kind, "nfe": nfe,
                         "rmse_vs_ref": float((images.double() - ref.double()).pow(2).mean().sqrt()),
                         "psnr_vs_ref": float(psnr(images, ref))})
        searches[sampler] = {"accepted": result.accepted, "reason": result.reason, "timesteps": result.timesteps,
                             "default_timesteps": list(getattr(result, "default_timesteps", []) or []),
                             "search_seconds": search_s, "model_evaluations": getattr(result, "model_evaluations",
                                                                                       None), **extra,
                             "default_options": "ratios of the quantization part" if sampler == "dc-solver"
                             else "DEIS defaults"}
    draw_grid(grid, out / "grid-schedule.png")
    return {"model": model, "nfe": nfe, "num_samples": n, "guidance": g, "ref_nfe": args.ref_nfe,
            "search_latents": args.search_latents, "rows": rows, "searches": searches}


# ---------------------------------------------------------------------------------------------------- Flux part


def flux_part(args: Any, out: Path, progress: bool) -> dict:
    """A random-weight Flux replica: full precision and each of ``--flux-presets``, DEIS and DC-Solver."""
    from pipelines.flux_replica import FluxReplicaConfig, flux_prompts, tiny_flux_pipeline

    cfg = FluxReplicaConfig()
    nfe, n = args.flux_nfe, args.flux_samples
    samplers = ("deis", "dc-solver")

    def run(pipe) -> tuple[torch.Tensor, torch.Tensor]:
        """Final latents (unpacked by the callback's last call) and decoded images, one prompt and seed each."""
        prompts = flux_prompts(pipe, n, seed=args.seed)
        last: dict = {}

        def keep(p, i, t, kw):
            last["latents"] = kw["latents"].detach().clone()
            return {}

        images = pipe(prompt_embeds=torch.cat([p["prompt_embeds"] for p in prompts]),
                      pooled_prompt_embeds=torch.cat([p["pooled_prompt_embeds"] for p in prompts]),
                      height=cfg.image_size, width=cfg.image_size, num_inference_steps=nfe,
                      generator=[torch.Generator().manual_seed(args.seed + i) for i in range(n)], output_type="pt",
                      callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images
        return last["latents"], images.float()

    fp = tiny_flux_pipeline(cfg)
    results, grid, ref = [], [], {}
    for sampler in samplers:
        use_sampler(fp, sampler)
        t0 = time.perf_counter()
        ref[sampler] = run(fp)
        results.append({"precision": "fp", "sampler": sampler, "seconds": time.perf_counter() - t0})
        grid.append((f"FP, {sampler} {nfe}", ref[sampler][1]))
    fp_params = sum(p.numel() for p in fp.transformer.parameters())
    for preset in args.flux_presets:
        pipe = tiny_flux_pipeline(cfg)  # the same random weights (seeded)
        t0 = time.perf_counter()
        quantize_pipeline(pipe, preset, call_kwargs=flux_prompts(pipe, args.flux_calib, seed=CALIB_SEED),
                          num_inference_steps=nfe, seed=CALIB_SEED, progress=False)
        calib_s = time.perf_counter() - t0
        for sampler in samplers:
            use_sampler(pipe, sampler)
            t0 = time.perf_counter()
            latents, images = run(pipe)
            results.append({"precision": preset, "sampler": sampler, "seconds": time.perf_counter() - t0,
                            "calibration_seconds": calib_s,
                            "latent_sqnr_db": sqnr_db(ref[sampler][0], latents),
                            "image_sqnr_db": sqnr_db(ref[sampler][1], images),
                            "image_psnr_db": float(psnr(images, ref[sampler][1]))})
            grid.append((f"{preset}, {sampler} {nfe}", images))
    draw_grid(grid, out / "grid-flux.png", scale=2, columns=n)
    return {"pipeline": "FluxPipeline (random weights, pipelines.flux_replica)", "config": vars(cfg) | {
        "axes_dims_rope": list(cfg.axes_dims_rope)}, "transformer_parameters": fp_params, "nfe": nfe,
        "num_samples": n, "calibration_prompts": args.flux_calib, "dc_ratios": "none (ratios 1: UniPC)",
        "results": results}
