"""DC-Solver ratio search for pipelines and exact Gaussian-mixture references (DC-Solver, Zhao et al. ECCV 2024).

* :func:`gmm_denoise` / :func:`gmm_reference`: a differentiable guided denoiser and the exact PF-ODE states at every
  node of a scheduler, for :class:`pipelines.gmm.GMMDenoiser`.
* :func:`search_dc_ratios`: the greedy search on a DigitsPipeline-like pipeline (``pipe.unet(x, t, class_labels)``),
  optionally with a quantized backbone searched against a full-precision reference pipeline/backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import dmq
from samplers import DCSolverScheduler, ddim_reference
from samplers import search_dc_ratios as _search

from .gmm import GMMDenoiser, reference_sample

__all__ = ["gmm_denoise", "gmm_reference", "guided_denoise", "search_dc_ratios"]


def gmm_denoise(model: GMMDenoiser, labels: torch.Tensor | None, guidance_scale: float) -> Callable:
    """``denoise(x, t)``: the exact guided model output, differentiable in ``x`` (``GMMDenoiser.forward`` detaches)."""
    null = None if labels is None else torch.full_like(labels, model.mixture.null_label)

    def denoise(x: torch.Tensor, t: Any) -> torch.Tensor:
        n = x.shape[0]
        a, s = model.alpha_sigma(torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(n))
        if labels is None or guidance_scale == 1.0:
            return model.predict(x, a, s, labels).to(x.dtype)
        both = model.predict(torch.cat([x, x]), torch.cat([a, a]), torch.cat([s, s]), torch.cat([labels, null]))
        c, u = both.chunk(2)
        return (u + guidance_scale * (c - u)).to(x.dtype)

    return denoise


def gmm_reference(
    model: GMMDenoiser, scheduler: DCSolverScheduler, x_T: torch.Tensor, labels: torch.Tensor | None,
    guidance_scale: float, num_inference_steps: int,
) -> list[torch.Tensor]:
    """Exact PF-ODE states (DOP853, 1e-10) at ``t_1 … t_N`` of ``scheduler``'s grid, the last at ``σ = 0``."""
    scheduler.set_timesteps(num_inference_steps)
    ts = [float(t) for t in scheduler.timesteps.double()]
    out, x, t0 = [], x_T.to(torch.float64), ts[0]
    for t1 in ts[1:] + [0.0]:
        x = reference_sample(model, x, labels, guidance_scale, t_start=t0, t_end=t1)
        out.append(x)
        t0 = t1
    return out


def guided_denoise(backbone: torch.nn.Module, labels: torch.Tensor, null_label: int, guidance_scale: float,
                   dtype: torch.dtype | None = None) -> Callable:
    """``denoise(x, t)`` for a class-conditional backbone ``backbone(x, t, class_labels).sample`` with CFG."""
    null = torch.full_like(labels, null_label)

    def denoise(x: torch.Tensor, t: Any) -> torch.Tensor:
        xin = x if dtype is None else x.to(dtype)
        tt = torch.as_tensor(t, device=x.device).reshape(-1).expand(2 * x.shape[0])
        out = backbone(torch.cat([xin, xin]), tt, class_labels=torch.cat([labels, null])).sample.to(x.dtype)
        c, u = out.chunk(2)
        return u + guidance_scale * (c - u)

    return denoise


def search_dc_ratios(
    pipe: Any,
    labels_or_prompts: Sequence[int] | torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    *,
    reference_pipe: Any | None = None,
    reference_backbone: torch.nn.Module | None = None,
    num_latents: int | None = None,
    fine_steps: int = 250,
    iters: int = 20,
    lr: float = 0.1,
    seed: int = 0,
    scheduler: DCSolverScheduler | None = None,
    held_out: float | int | None = 0.5,
    progress: bool = True,
) -> tuple[list[float], list[float]]:
    """Search DC ratios for a class-conditional pipeline (``pipe.unet``/``pipe.transformer``, null class
    ``pipe.null_class`` or ``num_classes``). The reference is a ``fine_steps``-step DDIM run of
    ``reference_backbone`` (or ``reference_pipe``'s backbone; default: the same backbone), so a quantized ``pipe``
    is fitted to the full-precision trajectory. ``held_out`` of the latents check the ratios (all 1 when they do
    worse there than plain UniPC). Returns ``(ratios, losses)``; ``pipe.scheduler`` is not changed.
    """
    if isinstance(labels_or_prompts, str) or (
        isinstance(labels_or_prompts, Sequence) and labels_or_prompts and isinstance(labels_or_prompts[0], str)
    ):
        raise ValueError("text prompts are not supported yet: pass class labels (ints)")
    labels = torch.as_tensor(labels_or_prompts, dtype=torch.long).reshape(-1)
    if num_latents is not None:
        labels = labels.repeat((num_latents + len(labels) - 1) // len(labels))[:num_latents]
    backbone = _backbone(pipe)
    ref_backbone = reference_backbone or (_backbone(reference_pipe) if reference_pipe is not None else backbone)
    null = _null_label(pipe)
    device = next(backbone.parameters()).device
    sched = scheduler or DCSolverScheduler.from_config(pipe.scheduler.config)
    cfg = backbone.config
    shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = labels.to(device)
    ref = ddim_reference(guided_denoise(ref_backbone, labels, null, guidance_scale), sched, x_T, num_inference_steps,
                         fine_steps)
    # The search back-propagates through the model. A packed backbone's integer / FP8 GEMMs take their input as
    # codes and have no gradient, so the search runs the dequantizing path, which computes the same fake-quant
    # function (see dmq.kernels).
    with dmq.kernels.disable("int_gemm", "fp8_gemm"):
        return _search(guided_denoise(backbone, labels, null, guidance_scale), sched, x_T, num_inference_steps,
                       reference=ref, iters=iters, lr=lr, held_out=held_out, progress=progress)


def _backbone(pipe: Any) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name)
    raise ValueError("pipe must have a `unet` or `transformer` backbone")


def _null_label(pipe: Any) -> int:
    for name in ("null_class", "null_label", "num_classes"):
        v = getattr(pipe, name, None)
        if isinstance(v, int):
            return v
    return int(getattr(_backbone(pipe).config, "num_class_embeds", 11)) - 1
