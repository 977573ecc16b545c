"""``quantize_pipeline``: timestep-aware post-training quantization of a diffusers pipeline's denoising backbone.

The backbone (``unet`` or ``transformer``) is quantized with :func:`dmq.quantize`, then calibrated by running the
pipeline itself on the calibration prompts (or keyword sets): every backbone call of those sampling runs is a
calibration point at its true timestep, in full precision (Q-Diffusion's time-step-aware calibration data, taken
from the model's own trajectory), and :func:`dmq.freeze` fixes the activation scales. Under ``torch.distributed``
each process runs its share of the calls and :func:`dmq.sync_statistics` reduces the statistics exactly.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import dmq
from dmq import calibration
from dmq import validation as check
from dmq.calibration import CONTEXT, get_policy
from dmq.transaction import transaction
from pipelines import offload

logger = logging.getLogger(__name__)

# the components that are the denoiser by default: a U-Net or a transformer, and Wan 2.2's low-noise expert
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoder_config(config: str | dmq.QuantConfig) -> dmq.QuantConfig:
    """A weight-only config for text encoders: ``"w8a16"`` (INT8 per output channel, MSE clipping), any weight-only
    preset (``"w4a16"``) or a :class:`dmq.QuantConfig` without activation or attention quantizers."""
    if config == "w8a16":
        cfg = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel", estimator="mse"), name="w8a16")
    else:
        cfg = dmq.get_config(config)
    if cfg.act is not None or cfg.attn is not None:
        raise ValueError(f"text encoders are quantized weight-only; {cfg.name!r} quantizes activations (use "
                         "'w8a16', 'w4a16' or a QuantConfig with act=None and attn=None)")
    return cfg.replace(keep_fp=())


def _component(pipe: Any, name: str) -> object:
    obj = pipe
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj


def find_denoisers(pipe: Any, names: str | Sequence[str] | None = None,
                   config: dmq.QuantConfig | None = None, *, quantized_ok: bool = False) -> dict[str, nn.Module]:
    """The denoisers to quantize, by component name (dotted paths reach nested pipelines).

    ``names=None`` takes every one of :data:`DENOISER_ATTRS` the pipeline has (its U-Net or transformer, and Wan
    2.2's second expert ``transformer_2``); name others explicitly (``"controlnet"``, a refiner's ``"unet"``).
    Anything that cannot be calibrated through the pipeline is refused with a ``ValueError`` that says why.
    """
    from diffusers import ModelMixin

    if isinstance(names, str):
        names = [names]
    if names is None:
        names = [n for n in DENOISER_ATTRS if isinstance(getattr(pipe, n, None), nn.Module)]
        if not names:
            comps = sorted(k for k, v in getattr(pipe, "components", {}).items() if isinstance(v, nn.Module))
            raise ValueError(f"{type(pipe).__name__} has no `unet`, `transformer` or `transformer_2` denoiser; name "
                             f"the denoiser with denoisers=[...] (its nn.Module components: {comps})")
    out: dict[str, nn.Module] = {}
    for name in names:
        mod = _component(pipe, name)
        where = f"{type(pipe).__name__}.{name}"
        if mod is None:
            raise ValueError(f"{where} does not exist or is None: nothing to quantize there")
        if not isinstance(mod, ModelMixin):
            raise ValueError(f"{where} is a {type(mod).__name__}, not a diffusers ModelMixin: quantize_pipeline "
                             "saves and reloads denoisers through their diffusers config; quantize a plain "
                             "nn.Module with dmq.quantize / dmq.calibrate / dmq.freeze")
        if any(mod is m for m in out.values()):
            raise ValueError(f"{where} is the same module as another named denoiser; name it once")
        if getattr(mod, "_dmq", None) is not None and not quantized_ok:
            raise ValueError(f"pipe.{name} is already quantized; dmq.restore(pipe.{name}) first")
        binned = config is not None and any(s is not None and not s.dynamic and s.timestep_bins > 1
                                            for s in (config.act, config.attn, config.attn_probs))
        if binned and calibration.timestep_argument(mod) is None:
            raise ValueError(f"{where} ({type(mod).__name__}) takes no timestep argument "
                             f"({', '.join(calibration.TIMESTEP_ARGS)}), so timestep bins cannot follow the "
                             f"sampling run; use a config with timestep_bins=1 (config {config.name!r} has bins)")
        out[name] = mod
    return out


def find_backbone(pipe: Any) -> tuple[str, nn.Module]:
    """``(attribute, module)`` of the pipeline's first default denoiser (see :func:`find_denoisers`)."""
    name, mod = next(iter(find_denoisers(pipe, quantized_ok=True).items()))
    return name, mod


@dataclass
class CalibrationRecord:
    """What calibration did (``pipe.dmq_calibration``): pipeline calls run by this process, the distinct timesteps
    of its calibration points (sorted), calibration points over all processes, processes, seconds."""

    config: str
    calls: int
    processes: int
    points: int
    timesteps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    text_encoders: list[str] = field(default_factory=list)
    denoisers: dict[str, dict] = field(default_factory=dict)  # per denoiser: points, timesteps, bin range


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Contiguous share ``rank`` of ``world`` (the first ranks take the remainder), as accelerate splits them."""
    n, k = len(items), world
    base, extra = divmod(n, k)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


def _calls(prompts: Sequence[str] | None, call_kwargs: Sequence[dict] | None, batch_size: int) -> list[dict]:
    if (prompts is None) == (call_kwargs is None):
        raise ValueError("pass exactly one of prompts= (text-to-image) or call_kwargs= (a list of keyword dicts "
                         "for pipe(...), e.g. [{'class_labels': [1, 2]}], [{'prompt_embeds': e}], [{'batch_size': 2}]")
    if prompts is not None:
        prompts = check.strings("prompts", prompts, "prompt string")
        calls = [{"prompt": list(prompts[i:i + batch_size])} for i in range(0, len(prompts), batch_size)]
    else:
        if isinstance(call_kwargs, (dict, str, bytes)) or not isinstance(call_kwargs, Sequence) \
                or not all(isinstance(kw, dict) for kw in call_kwargs):
            raise TypeError(f"call_kwargs must be a list of dicts of keyword arguments for pipe(...), got "
                            f"{type(call_kwargs).__name__}")
        calls = [dict(kw) for kw in call_kwargs]
    if not calls:
        raise ValueError("no calibration data: prompts / call_kwargs is empty")
    return calls


def _call_defaults(pipe: Any, num_inference_steps: int, guidance_scale: float | None) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    out: dict[str, Any] = {"num_inference_steps": num_inference_steps}
    if guidance_scale is not None:
        if "guidance_scale" not in params:
            raise ValueError(f"{type(pipe).__name__} takes no guidance_scale; leave guidance_scale=None")
        out["guidance_scale"] = guidance_scale
    if "output_type" in params:  # calibration needs the denoiser calls only: skip the VAE decode where there is one
        out["output_type"] = "latent" if getattr(pipe, "vae", None) is not None else "np"
    return out


def _scheduler_range(pipe: Any, steps: int, n_train: int | None) -> tuple[float, float]:
    """Where the timestep bins start: ``[0, num_train_timesteps)``, or, for a scheduler whose timesteps leave that
    interval (EDM's continuous ``c_noise = log(σ)/4``, Stable Video Diffusion: about -1.55..1.64), the span of its
    timesteps at the calibration step count (Karras sigmas always span ``[sigma_min, sigma_max]``)."""
    hi = float(n_train) if n_train else 1000.0
    sched = getattr(pipe, "scheduler", None)
    if sched is None or not callable(getattr(sched, "set_timesteps", None)):
        return 0.0, hi
    probe = copy.deepcopy(sched)
    try:
        probe.set_timesteps(steps)
    except (TypeError, ValueError):  # it needs the pipeline's own arguments (Flux's mu, ...): the default span
        return 0.0, hi
    ts = torch.as_tensor(getattr(probe, "timesteps", [])).double()
    if ts.numel() < 2 or (float(ts.min()) >= 0.0 and float(ts.max()) <= hi):
        return 0.0, hi
    return float(ts.min()), float(ts.max())


def quantize_pipeline(
    pipe: Any,
    config: str | dmq.QuantConfig = "w8a8",
    *,
    prompts: Sequence[str] | None = None,
    call_kwargs: Sequence[dict] | None = None,
    denoisers: str | Sequence[str] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    timestep_selection: str | dmq.StepPolicy | None = None,
    seed: int = 0,
    batch_size: int = 1,
    text_encoders: str | dmq.QuantConfig | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    pack: bool = True,
    progress: bool = True,
) -> Any:
    """Quantize ``pipe``'s denoiser(s) with timestep-aware calibration through the pipeline itself; in place.

    Args:
        pipe: a diffusers pipeline whose denoiser is a diffusers ``ModelMixin`` (any U-Net, 2-D or 3-D transformer,
            ControlNet, ...).
        config: a dmq preset name (``dmq.preset_names()``) or :class:`dmq.QuantConfig`.
        prompts: calibration prompts for text-to-image pipelines, ``batch_size`` per pipeline call.
        call_kwargs: instead of prompts, one keyword dict per calibration call of ``pipe(...)``
            (``prompt_embeds``/``negative_prompt_embeds``, ``class_labels``, ``batch_size``, ...).
        denoisers: the components to quantize (:func:`find_denoisers`); default the pipeline's ``unet`` or
            ``transformer`` and, where there is one, ``transformer_2`` (Wan 2.2's second expert). Name a ControlNet
            or any other ``ModelMixin`` component to quantize it too. Each has its own calibration statistics and
            its own timestep state.
        num_inference_steps, guidance_scale: the calibration sampling runs (``guidance_scale=None`` keeps the
            pipeline's default); classifier-free guidance batches both branches, so both are observed.
        timestep_selection: which backbone calls count (``"all"``, ``"uniform"``, ``"normal"`` or a
            :class:`dmq.StepPolicy`); default the config's (all).
        seed: call ``i`` samples with ``torch.Generator().manual_seed(seed + i)``.
        text_encoders: also quantize the text encoders' weights (weight-only: ``"w8a16"``, ``"w4a16"``, ...).
        include, exclude: module-name globs for :func:`dmq.quantize` (applied to every denoiser).
        pack: ``dmq.freeze(..., pack=True)``: store the weights packed and release the float weights (the memory
            saving). ``pack=False`` keeps the float weights (fake quantization), so :func:`restore_pipeline` can
            bring the original model back.
        progress: a tqdm bar over the calibration calls (rank 0 only).

    The timestep bins start on the scheduler's ``[0, num_train_timesteps)`` (or the span of its timesteps where they
    leave it: EDM's continuous noise levels); a denoiser that receives normalised
    timesteps (Flux: ``t / 1000``) has them moved to ``[0, 1]`` at its first calibration call
    (:class:`dmq.calibration.ModelClock`). Several denoisers calibrate in the same sampling runs; with PTQ methods
    that need several passes (smoothing, AdaRound, GPTQ, ...) they calibrate one after the other while the others
    run in full precision.
    Under an initialised ``torch.distributed`` process group (``accelerate launch``, ``torchrun``) the calls are
    split between processes and the statistics all-reduced, which gives the same scales as one process running
    them all. The VAE stays in full precision. Offloaded backbones (accelerate hooks, ``meta`` weights) work.
    Every argument is checked before anything changes (``TypeError`` / ``ValueError`` naming it). If the first
    calibration call makes the backbone return non-finite values (NaN, inf), calibration stops there with a
    ``ValueError``. On any failure or interruption (``KeyboardInterrupt`` included) the pipeline is left exactly as
    it was (modules, weights, hooks, text encoders) and the original exception re-raised.
    Returns ``pipe``, with ``pipe.dmq_calibration`` (:class:`CalibrationRecord`).
    """
    cfg = dmq.get_config(config)
    num_inference_steps = check.integer("num_inference_steps", num_inference_steps, minimum=1)
    batch_size = check.integer("batch_size", batch_size, minimum=1)
    if guidance_scale is not None:
        guidance_scale = check.real("guidance_scale", guidance_scale)
    if timestep_selection is not None:
        get_policy(timestep_selection, "timestep_selection")  # TypeError / ValueError before anything changes
    include, exclude = check.globs("include", include), check.globs("exclude", exclude)
    pack, progress = check.boolean("pack", pack), check.boolean("progress", progress)
    n_train = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    span = _scheduler_range(pipe, num_inference_steps, n_train)
    if cfg.timestep_range == (0.0, 1000.0) and span != cfg.timestep_range:
        cfg = cfg.replace(timestep_range=span)
    models = find_denoisers(pipe, denoisers, cfg)
    te_cfg = text_encoder_config(text_encoders) if text_encoders is not None else None
    calls = _calls(prompts, call_kwargs, batch_size)
    seed = check.integer("seed", seed, minimum=0, maximum=2**63 - 1 - len(calls))
    defaults = _call_defaults(pipe, num_inference_steps, guidance_scale)
    rank, world = _rank_world()
    mine = shard(list(enumerate(calls)), rank, world)

    done: list[tuple[nn.Module, offload.OffloadRecord]] = []
    t0 = time.perf_counter()
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    roots = [pipe] + [s for s in (getattr(pipe, "scheduler", None),) if s is not None]
    try:
        with transaction(*roots, covers_nested=True):  # nothing inside catches: one snapshot for all
            te_names, processes, seen = _quantize_pipeline(pipe, models, cfg, te_cfg, include, exclude, pack,
                                                           progress, mine, defaults, seed, timestep_selection, rank,
                                                           done)
    except BaseException:
        logger.warning("quantize_pipeline failed: %s left as it was", type(pipe).__name__)
        raise
    finally:
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = bar_config
    pipe._dmq_quantized = done
    per = {name: {"class": type(m).__name__, "points": dmq.summary(m)["calibration_points"],
                  "timesteps": sorted(seen[name]), "timestep_range": list(m._dmq.clock.range),
                  "unobserved": list(m._dmq.unobserved)} for name, m in models.items()}
    pipe.dmq_calibration = CalibrationRecord(
        config=cfg.name, calls=len(mine), processes=processes, points=sum(d["points"] for d in per.values()),
        timesteps=sorted(set().union(*seen.values())), seconds=time.perf_counter() - t0, text_encoders=te_names,
        denoisers=per)
    logger.info("quantize_pipeline: %s on %s, %d calibration points over %d process(es)", cfg.name,
                ", ".join(f"{n} ({type(m).__name__})" for n, m in models.items()), pipe.dmq_calibration.points,
                processes)
    return pipe


def _quantize_pipeline(pipe, models, cfg, te_cfg, include, exclude, pack, progress, mine, defaults, seed,
                       timestep_selection, rank, done) -> tuple[list[str], int, dict[str, set[float]]]:
    """The body of :func:`quantize_pipeline`, inside its transaction."""
    te_names = []
    if te_cfg is not None:
        for te_attr in TEXT_ENCODER_ATTRS:
            te = getattr(pipe, te_attr, None)
            if isinstance(te, nn.Module):
                done.append((te, _quantize_module(te, te_cfg, None, None)))
                dmq.freeze(te, pack=pack)  # weight-only: nothing to calibrate, and no timestep hook needed
                te_names.append(te_attr)
    first = {"call": True}

    def finite_outputs(module, args, kwargs, output):
        if first["call"]:
            _check_finite(pipe, output)

    seen: dict[str, set[float]] = {}
    handles = []
    for name, model in models.items():
        done.append((model, _quantize_module(model, cfg, include, exclude)))
        seen[name] = set()
        handles += [model.register_forward_pre_hook(_recorder(seen[name]), with_kwargs=True),
                    model.register_forward_hook(finite_outputs, with_kwargs=True)]
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def loop() -> None:
        for i, kw in tqdm(mine, desc=f"calibrating {cfg.name}", disable=not progress or rank != 0):
            pipe(**{**defaults, "generator": torch.Generator().manual_seed(seed + i), **kw})
            first["call"] = False

    try:
        _calibrate_all(list(models.values()), loop, timestep_selection, cfg)
    finally:
        for h in handles:
            h.remove()
    processes = 1
    for model in models.values():
        processes = dmq.sync_statistics(model)
        dmq.freeze(model, pack=pack)
    return te_names, processes, seen


def _recorder(seen: set[float]):
    """A pre-hook (after the model's timestep hook) that records the timesteps of its observed calls."""

    def record(module, args, kwargs):
        if CONTEXT.timestep is not None and CONTEXT.observe:
            seen.update(float(v) for v in CONTEXT.timestep.unique())
    return record


def _calibrate_all(models: list[nn.Module], loop, steps, cfg: dmq.QuantConfig) -> None:
    """Calibrate every model on the pipeline runs of ``loop``. Round-to-nearest configs need one observer pass
    per model, so the calibrations nest and one set of sampling runs calibrates them all; configs with PTQ methods
    run several passes, so the models calibrate one after the other, each with the others in full precision."""
    if len(models) == 1 or not _multi_pass(cfg):
        def nest(i: int):
            if i == len(models):
                return lambda _m: loop()
            return lambda _m: dmq.calibrate(models[i], nest(i + 1), steps=steps)
        nest(0)(None)
        return
    for i, model in enumerate(models):
        with contextlib.ExitStack() as stack:
            for other in models[:i] + models[i + 1:]:
                stack.enter_context(dmq.full_precision(other))  # the rest run on the full-precision trajectory
            dmq.calibrate(model, lambda _m: loop(), steps=steps)


def _multi_pass(cfg: dmq.QuantConfig) -> bool:
    return (cfg.rounding != "rtn" or cfg.format_search or cfg.smooth is not None or cfg.rotation is not None
            or cfg.lowrank > 0)


def _check_finite(pipe: Any, output: object) -> None:
    """Fail fast: ``ValueError`` if a backbone output of the first calibration call holds NaN or inf (calibrating on
    it would give scales from the finite remainder only, or none)."""
    parts = output.to_tuple() if hasattr(output, "to_tuple") else output if isinstance(output, tuple) else (output,)
    t = next((p for p in parts if isinstance(p, torch.Tensor)), None)
    if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"the first calibration call of {type(pipe).__name__} made the backbone return {bad} non-finite "
            f"(NaN/inf) values of {t.numel()}: check the calibration inputs (prompt embeddings, call_kwargs, "
            "guidance_scale); nothing was quantized")


def _restore(done: list[tuple[nn.Module, offload.OffloadRecord]]) -> None:
    for mod, rec in reversed(done):
        if getattr(mod, "_dmq", None) is not None:
            dmq.restore(mod)
        if rec:
            offload.undo(mod, rec)


def restore_pipeline(pipe: Any) -> Any:
    """Undo :func:`quantize_pipeline`: the float backbone and text encoders come back, with their accelerate
    offloading hooks where they had them. Returns ``pipe``.

    A backbone quantized with ``pack=True`` (the default) has released its float weights: this then raises
    ``ValueError`` and leaves the pipeline quantized (quantize with ``pack=False`` to be able to restore)."""
    done = getattr(pipe, "_dmq_quantized", None)
    if done is None:
        raise ValueError("pipeline was not quantized by quantize_pipeline")
    if any(dmq.summary(mod)["packed"] for mod, _ in done if getattr(mod, "_dmq", None) is not None):
        raise ValueError("the pipeline was quantized with pack=True, which released the float weights: reload it, "
                         "or quantize with quantize_pipeline(..., pack=False) to be able to restore it")
    _restore(done)
    del pipe._dmq_quantized
    return pipe


def _quantize_module(module: nn.Module, cfg: dmq.QuantConfig, include, exclude) -> offload.OffloadRecord:
    """dmq.quantize, materialising accelerate-offloaded weights first and re-offloading after."""
    rec = offload.materialize(module) if offload.is_offloaded(module) else offload.OffloadRecord()
    try:
        dmq.quantize(module, cfg, include=include, exclude=exclude)
    except BaseException:
        if rec:
            offload.undo(module, rec)
        raise
    if rec:
        offload.reoffload(module, rec)
    return rec
