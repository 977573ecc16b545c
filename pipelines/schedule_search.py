"""Searched schedules (and DC ratios on them) for class-conditional pipelines, optionally quantization-aware.

:func:`search_schedule` wraps :func:`samplers.search_schedule` for a DigitsPipeline-like pipeline
(``pipe.unet``/``pipe.transformer`` called as ``backbone(x, t, class_labels)``). With ``reference_pipe`` or
``reference_backbone`` (full precision) the teacher trajectory and the targets come from that model while the
schedule is run on ``pipe``'s (quantized) backbone, so the schedule also absorbs quantization error.
:func:`fit_sampler` searches the schedule, then the DC ratios on it (DC-Solver), then fits the solver's coefficients
on both (:func:`samplers.fit_coefficients`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import dmq
from samplers import DCSolverScheduler, fit_coefficients
from samplers import search_dc_ratios as _search_ratios
from samplers import search_schedule as _search_schedule
from samplers.dc import ddim_reference
from samplers.schedule_search import ScheduleSearchResult

from .dc_search import _backbone, _null_label, guided_denoise

__all__ = ["fit_sampler", "search_schedule"]


def _setup(pipe: Any, labels_or_prompts: Any, num_latents: int | None, guidance_scale: float, seed: int,
           reference_pipe: Any | None, reference_backbone: torch.nn.Module | None):
    if isinstance(labels_or_prompts, str) or (
        isinstance(labels_or_prompts, Sequence) and labels_or_prompts and isinstance(labels_or_prompts[0], str)
    ):
        raise ValueError("text prompts are not supported yet: pass class labels (ints)")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
    labels = torch.as_tensor(labels_or_prompts, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("labels_or_prompts must hold at least one class label")
    if num_latents is not None:
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 2:
            raise ValueError(f"num_latents must be an int >= 2 (search and held-out rows), got {num_latents!r}")
        labels = labels.repeat((num_latents + len(labels) - 1) // len(labels))[:num_latents]
    backbone = _backbone(pipe)
    ref_backbone = reference_backbone or (_backbone(reference_pipe) if reference_pipe is not None else None)
    device = next(backbone.parameters()).device
    cfg = backbone.config
    shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = labels.to(device)
    null = _null_label(pipe)
    den = guided_denoise(backbone, labels, null, float(guidance_scale))
    ref_den = None if ref_backbone is None else guided_denoise(ref_backbone, labels, null, float(guidance_scale))
    return x_T, den, ref_den


def search_schedule(
    pipe: Any,
    labels_or_prompts: Sequence[int] | torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    *,
    reference_pipe: Any | None = None,
    reference_backbone: torch.nn.Module | None = None,
    num_latents: int | None = 16,
    held_out: float | int | None = 0.5,
    seed: int = 0,
    scheduler: Any | None = None,
    progress: bool = True,
    **search_options: Any,
) -> ScheduleSearchResult:
    """Search ``pipe.scheduler``'s (or ``scheduler``'s) ``num_inference_steps``-step schedule for ``pipe``'s backbone
    with classifier-free guidance ``guidance_scale`` and store it in that scheduler's config (when accepted).

    ``num_latents`` latents (seed ``seed``) cycle through the labels; ``held_out`` of them check the result.
    ``search_options`` go to :func:`samplers.search_schedule` (``method``, ``objective``, ``variants``,
    ``grid_points``, ``substeps``, ``refine_rounds``). Cost on the bundled models on one CPU thread: minutes,
    growing with the NFE and the number of variants (measured in docs/samplers.md).
    """
    x_T, den, ref_den = _setup(pipe, labels_or_prompts, num_latents, guidance_scale, seed, reference_pipe,
                               reference_backbone)
    target = pipe.scheduler if scheduler is None else scheduler
    return _search_schedule(den, target, x_T, num_inference_steps, reference_denoise=ref_den, held_out=held_out,
                            progress=progress, **search_options)


def fit_sampler(
    pipe: Any,
    labels_or_prompts: Sequence[int] | torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    *,
    reference_pipe: Any | None = None,
    reference_backbone: torch.nn.Module | None = None,
    num_latents: int | None = 16,
    held_out: float | int | None = 0.5,
    seed: int = 0,
    ratios: bool = True,
    coefficients: bool = True,
    grids: Any = "auto",
    node_rounds: int = 1,
    refine_iters: int = 0,
    refine_optimizer: str = "lbfgs",
    iters: int = 20,
    fine_steps: int = 250,
    progress: bool = True,
    **search_options: Any,
) -> dict:
    """Fit DC-Solver to ``pipe``: search the schedule (UniPC, all ratios 1), then the DC ratios on that schedule,
    then (``coefficients``) the solver's coefficients, on that schedule and the other ``grids`` (default
    :data:`samplers.coefficient_fit.AUTO_GRIDS`; the best one replaces the schedule; ``None`` with
    ``node_rounds=0``: the schedule found only), all against one ``fine_steps`` DDIM teacher
    (:class:`samplers.FineTeacher`); then ``node_rounds`` rounds move the best schedule's nodes with a fit at every
    trial (up to ``2 (num_inference_steps - 1)`` fits a round; 0: none); ``refine_iters`` iterations of
    ``refine_optimizer`` (``"lbfgs"``, or ``"adam"`` for a quantized backbone) then refine the chosen table as a
    whole through the model, kept only if the held-out latents agree (0: none; a backward pass through
    ``num_inference_steps`` model calls on all the latents per iteration).

    ``pipe.scheduler`` becomes a :class:`~samplers.DCSolverScheduler` (``from_config`` of the current one) holding
    all three in its config (saved by ``save_pretrained``). Each stage keeps what it started from when the
    held-out latents say so. A joint (alternating) schedule and ratio search was measured and did not pay
    (docs/samplers.md). Returns ``{"schedule": ScheduleSearchResult, "ratios": [...], "losses": [...],
    "coefficients": CoefficientFitResult | None}``.
    """
    x_T, den, ref_den = _setup(pipe, labels_or_prompts, num_latents, guidance_scale, seed, reference_pipe,
                               reference_backbone)
    sched = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios=None, cpr=None)
    found = _search_schedule(den, sched, x_T, num_inference_steps, reference_denoise=ref_den, held_out=held_out,
                             progress=progress, **search_options)
    out: dict[str, Any] = {"schedule": found, "ratios": [1.0] * num_inference_steps, "losses": [],
                           "coefficients": None}
    if ratios:
        ref = ddim_reference(ref_den or den, sched, x_T, num_inference_steps, fine_steps)
        # back-propagates through the model: a packed backbone runs its dequantizing path (as search_dc_ratios does)
        with torch.enable_grad(), dmq.kernels.disable("int_gemm", "fp8_gemm"):
            out["ratios"], out["losses"] = _search_ratios(den, sched, x_T, num_inference_steps, reference=ref,
                                                          iters=iters, held_out=held_out, progress=progress)
    if coefficients:  # on the schedule found and the other grids, against one shared teacher
        sched.set_timesteps(num_inference_steps)
        before = [float(t) for t in sched.timesteps.double()]
        out["coefficients"] = fit_coefficients(den, sched, x_T, num_inference_steps, reference_denoise=ref_den,
                                               held_out=held_out, grids=grids, fine_steps=fine_steps,
                                               node_rounds=node_rounds, refine_iters=refine_iters,
                                               refine_optimizer=refine_optimizer,
                                               progress=progress)
        fit = out["coefficients"]
        if fit.accepted and fit.timesteps != before and out["ratios"] != [1.0] * num_inference_steps:
            # the table moved to another grid; ratios searched for the old one would harm a run off the table
            sched.set_dc_ratios(None)
            out["ratios"] = [1.0] * num_inference_steps
    pipe.scheduler = sched
    return out
