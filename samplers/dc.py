"""Dynamic compensation and its ratio search (Zhao, Wang, Zhou & Lu, "DC-Solver", ECCV 2024).

* :func:`compensation_weights`: Lagrange weights ``ℓ_j(τ)`` of DC-Solver Eq. 10, ``τ = t_{i-1} + ρ (t_i - t_{i-1})``,
  over the last ``K+1`` outputs (newest first). They are plain arithmetic, so ``ρ`` may be a torch tensor with grad.
* :func:`search_dc_ratios`: the greedy per-step search of Sec. 3.3 (AdamW on ``ρ = 1 + ½ tanh(p)`` through the model
  so that the state after the next corrector matches a reference trajectory).
* :func:`ddim_reference`: that reference from a fine DDIM run of the same denoiser (the paper's 200-step DDIM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["BOUNDS", "bounded_ratio", "compensation_weights", "ddim_reference", "search_dc_ratios"]

logger = logging.getLogger(__name__)
BOUNDS = ("tanh", "none")


def compensation_weights(nodes: Sequence[float], ratio: Any) -> list[Any]:
    """``ℓ_j(τ)`` for ``τ = nodes[1] + ratio (nodes[0] - nodes[1])`` (DC-Solver Eq. 10); ``nodes`` newest first.

    ``ratio = 1`` gives ``[1, 0, …]`` (no compensation). Works for floats and torch scalars (differentiable in ratio).
    """
    tau = nodes[1] + ratio * (nodes[0] - nodes[1])
    out = []
    for j, tj in enumerate(nodes):
        w = 1.0
        for k, tk in enumerate(nodes):
            if k != j:
                w = w * (tau - tk) / (tj - tk)
        out.append(w)
    return out


def bounded_ratio(p: torch.Tensor, bound: str = "tanh") -> torch.Tensor:
    """``ρ = 1 + ½ tanh(p)`` (ρ ∈ (0.5, 1.5), the official ``bound_func='tanh'``) or ``ρ = 1 + p`` (``"none"``)."""
    if bound == "tanh":
        return 1 + 0.5 * torch.tanh(p)
    if bound == "none":
        return 1 + p
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_differentiable(denoise: Denoise, x: torch.Tensor, t: torch.Tensor, what: str = "the ratio search") -> None:
    probe = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = denoise(probe, t)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise ValueError(
            f"denoise must be differentiable in x (its output needs a grad_fn): {what} back-propagates "
            "through the model. Wrap the raw network, not a pipeline or a no_grad/detaching model."
        )


def _reference_at(reference: Any, i: int, t_next: float) -> torch.Tensor:
    if callable(reference):
        return reference(i, t_next)
    return reference[i]


def search_dc_ratios(
    denoise: Denoise,
    scheduler: Any,
    latents: torch.Tensor,
    num_inference_steps: int,
    *,
    reference: Sequence[torch.Tensor] | Callable[[int, float], torch.Tensor] | None = None,
    iters: int = 20,
    lr: float = 0.1,
    bound: str = "tanh",
    held_out: float | int | None = 0.5,
    fine_steps: int = 250,
    progress: bool = True,
) -> tuple[list[float], list[float]]:
    """Greedy DC ratio search (DC-Solver Sec. 3.3). Returns ``(ratios, losses)``, one per step.

    Args:
        denoise: ``denoise(x, t)`` → model output (guidance applied), differentiable in ``x``.
        scheduler: a :class:`~samplers.DCSolverScheduler` (its config: order, corrector, ``dc_order``…); it is
            ``set_timesteps(num_inference_steps)`` here and left with the found ratios in its config.
        latents: ``x_T`` at ``scheduler.timesteps[0]`` (about 10 samples, as in the paper).
        reference: the exact state after each step: ``reference[i]`` (or ``reference(i, t_{i+1})``) at
            ``t_{i+1}`` (the last one at ``σ = 0``), for all rows of ``latents``. Default: :func:`ddim_reference`
            with ``fine_steps`` steps of ``denoise`` (the package's fine reference). See ``pipelines.dc_search``.
        held_out: the last rows of ``latents`` (a fraction or a count) that the search does not see. If the found
            ratios are worse on them than plain UniPC (all ratios 1), all ratios are reset to 1 and the reason is
            logged. ``None``: no check.
        iters, lr: AdamW iterations and learning rate per step (paper: 20-40, 0.1).
        bound: ``"tanh"`` (``ρ = 1 + ½ tanh(p)``) or ``"none"`` (``ρ = 1 + p``).

    At step ``i`` the loss is ``MSE(x_{i+1}, x^ref_{i+1})`` where ``x_{i+1}`` is UniP with the compensated output
    followed by the next UniC (which evaluates the model at the predicted point: gradients flow through the model).
    Steps where compensation cannot apply (fewer than ``dc_order + 1`` outputs) keep ``ρ = 1`` and report their loss.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 1:
        raise ValueError(f"fine_steps must be an integer >= 1, got {fine_steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    from .schedule_search import held_out_rows  # local: schedule_search imports nothing of this module

    rows = latents.shape[0] - held_out_rows(latents.shape[0], held_out)
    sched = scheduler
    sched.register_to_config(dc_ratios=None, cpr=None, fitted_coefficients=None, fitted_timesteps=None)
    if reference is None:
        reference = ddim_reference(denoise, sched, latents.detach(), num_inference_steps, fine_steps)
    sched.set_timesteps(num_inference_steps, device=latents.device)
    n = len(sched.timesteps)
    ts = sched.timesteps
    _check_differentiable(denoise, latents, ts[0])
    ratios: list[float] = [1.0] * n
    losses: list[float] = []
    x = latents.detach()
    with torch.no_grad():
        out = denoise(x, ts[0])
    for i in tqdm(range(n), desc="DC ratio search", disable=not progress):
        t_next = float(ts[i + 1]) if i + 1 < n else None
        target = _reference_at(reference, i, t_next if t_next is not None else -1.0).to(x.device)

        def trial(ratio: Any) -> torch.Tensor:
            xp = sched.step(out, ts[i], x, dc_ratio=ratio).prev_sample
            if i + 1 < n:
                xp = sched.correct(denoise(xp, ts[i + 1]), xp)
            return (xp[:rows].to(target.dtype) - target[:rows]).pow(2).mean()

        snap = sched.state()
        if sched.compensates(i) and iters > 0:
            p = torch.zeros((), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.AdamW([p], lr=lr)
            best = (math.inf, 1.0)
            for _ in range(iters):
                sched.load_state(snap)
                opt.zero_grad()
                ratio = bounded_ratio(p, bound)
                with torch.enable_grad():
                    loss = trial(ratio)
                    loss.backward()
                if loss.item() < best[0]:
                    best = (loss.item(), float(ratio.detach()))
                opt.step()
            sched.load_state(snap)
            with torch.no_grad():
                last = float(bounded_ratio(p, bound))
                final = trial(last).item()
            ratios[i] = last if final <= best[0] else best[1]
        sched.load_state(snap)
        with torch.no_grad():
            x_new = sched.step(out, ts[i], x, dc_ratio=ratios[i]).prev_sample
            snap2 = sched.state()
            if i + 1 < n:
                out = denoise(x_new, ts[i + 1])
                losses.append((sched.correct(out, x_new)[:rows].to(target.dtype) - target[:rows]).pow(2).mean().item())
            else:
                losses.append((x_new[:rows].to(target.dtype) - target[:rows]).pow(2).mean().item())
            sched.load_state(snap2)
        x = x_new
        logger.debug("DC step %d: ratio %.4f, loss %.3e", i, ratios[i], losses[-1])
    if rows < latents.shape[0]:
        final = _reference_at(reference, n - 1, -1.0).to(latents.device)
        held_err = _final_error(denoise, sched, latents, num_inference_steps, ratios, final, rows)
        plain_err = _final_error(denoise, sched, latents, num_inference_steps, [1.0] * n, final, rows)
        if held_err >= plain_err:
            logger.warning("search_dc_ratios: keeping ratios 1 (plain UniPC): the searched ratios are worse on %d "
                           "held-out latents (%.3e >= %.3e), they overfitted the search latents",
                           latents.shape[0] - rows, held_err, plain_err)
            ratios = [1.0] * n
    sched.register_to_config(dc_ratios=[float(r) for r in ratios])
    sched.set_timesteps(num_inference_steps, device=latents.device)
    return ratios, losses


@torch.no_grad()
def _final_error(denoise: Denoise, sched: Any, latents: torch.Tensor, n: int, ratios: list[float],
                 final: torch.Tensor, rows: int) -> float:
    """MSE of the final sample against ``final`` on the held-out rows ``rows:``, with ``ratios``."""
    sched.set_timesteps(n, device=latents.device)
    x = latents.detach()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(denoise(x, t), t, x, dc_ratio=ratios[i]).prev_sample
    return float((x[rows:].to(final.dtype) - final[rows:]).pow(2).mean())


@torch.no_grad()
def ddim_reference(
    denoise: Denoise, scheduler: Any, latents: torch.Tensor, num_inference_steps: int, fine_steps: int = 250
) -> list[torch.Tensor]:
    """States at ``t_1 … t_N`` (the last at ``σ = 0``) of a ``fine_steps``-step DDIM run of ``denoise`` from
    ``latents`` at ``t_0``; each coarse interval is split uniformly in ``log ρ`` so the coarse nodes lie on the grid.

    ``scheduler`` is a :class:`~samplers.DCSolverScheduler` (for its timesteps and noise schedule).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    sch = scheduler.schedule
    nodes = [float(t) for t in scheduler.timesteps.double().cpu()]
    per = max(1, math.ceil(fine_steps / len(nodes)))
    x = latents.to(torch.float64)
    out: list[torch.Tensor] = []
    targets = nodes[1:] + [sch.t_clean]
    t = nodes[0]
    for t_end in targets:
        r0, r1 = float(sch.rho(t)), float(sch.rho(t_end))
        lo = r1 if r1 > 0 else float(sch.rho(sch.t_min))  # the last interval: down to ρ(t_min), then one step to 0
        rhos = [math.exp(math.log(r0) + (math.log(lo) - math.log(r0)) * k / per) for k in range(1, per + 1)]
        if r1 == 0:
            rhos.append(0.0)
        rho = r0
        for r in rhos:
            tt = float(sch.t_of_rho(rho))
            m = denoise(x.to(latents.dtype), torch.tensor(tt, dtype=torch.float64)).to(torch.float64)
            a, s = (float(v) for v in sch.alpha_sigma(rho))
            eps, x0 = scheduler.convert_output(m, x, a, s)
            a2, s2 = (float(v) for v in sch.alpha_sigma(r))
            x = a2 * x0 + s2 * eps
            rho = r
        out.append(x.clone())
        t = t_end
    return out
