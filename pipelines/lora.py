"""LoRA on a pipeline's backbone through peft: add, fine-tune, move to another backbone, fuse and unfuse.

The backbone may be full precision or quantized by dmq (a frozen ``QuantLinear``/``QuantConv2d`` stays an
``nn.Linear``/``nn.Conv2d``, so peft wraps it and adds its 16-bit branch beside the packed weight;
docs/diffusers-backend.md#lora). That makes the usual workflow work on a quantized model: fine-tune a LoRA on the float
model, then load it onto the quantized one. These helpers serve backbones without diffusers' ``PeftAdapterMixin``
(the bundled digits ``UNet2DModel`` and ``DiTTransformer2DModel``); pipelines with ``load_lora_weights`` can use that.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (Eq. 3: ``h = W0 x + B A x α/r``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

__all__ = ["DEFAULT_TARGETS", "add_lora", "fuse_lora", "load_lora", "lora_layers", "lora_state_dict",
           "set_lora_enabled", "train_lora", "unfuse_lora"]

logger = logging.getLogger(__name__)
# attention projections and the feed-forward of diffusers' transformer blocks (peft matches name suffixes)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def add_lora(backbone: torch.nn.Module, rank: int = 8, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, adapter_name: str = "default",
             init_lora_weights: bool = True, seed: int | None = 0) -> LoraConfig:
    """Add a rank-``rank`` LoRA (scale ``alpha / rank``; ``alpha`` defaults to ``rank``) to ``backbone`` in place and
    return its config. ``init_lora_weights=True`` starts with ``B = 0`` (the output is unchanged), as for training.
    Only the adapter's parameters are left trainable. The random initialisation draws from
    ``torch.manual_seed(seed)`` inside a forked RNG (the global state is left as it was); ``seed=None`` draws from the
    global generator."""
    _check_int("rank", rank, 1)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"alpha must be a number > 0 or None, got {alpha!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of module-name suffixes, got {target_modules!r}")
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                        init_lora_weights=init_lora_weights)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, backbone, adapter_name=adapter_name)  # peft: ValueError if no target matches
    for name, p in backbone.named_parameters():
        p.requires_grad_(f"lora_A.{adapter_name}." in name or f"lora_B.{adapter_name}." in name)
    return config


def lora_layers(backbone: torch.nn.Module) -> list[BaseTunerLayer]:
    """The layers peft wrapped with an adapter."""
    return [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]


def lora_state_dict(backbone: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's naming, adapter name stripped), detached copies."""
    state = get_peft_model_state_dict(backbone, adapter_name=adapter_name) if any(
        adapter_name in getattr(m, "lora_A", {}) for m in lora_layers(backbone)) else {}
    if not state:
        raise ValueError(f"backbone has no LoRA adapter named {adapter_name!r}")
    return {k: v.detach().clone() for k, v in state.items()}


def load_lora(backbone: torch.nn.Module, state_dict: dict[str, torch.Tensor], config: LoraConfig,
              adapter_name: str = "default") -> None:
    """Add the adapter ``config`` to ``backbone`` (float or quantized) and load ``state_dict`` into it. Every key
    must land: a mismatch raises ``ValueError`` naming the keys."""
    inject_adapter_in_model(config, backbone, adapter_name=adapter_name)
    result = set_peft_model_state_dict(backbone, state_dict, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"LoRA state_dict does not match the backbone: unexpected keys {unexpected[:5]}, "
                         f"missing {missing[:5]}")
    for p in backbone.parameters():
        p.requires_grad_(False)


def fuse_lora(backbone: torch.nn.Module, adapter_names: Sequence[str] | None = None) -> int:
    """Merge the active (or the named) adapters into their layers (peft ``merge``; on a quantized layer the delta goes
    to its 16-bit ``lora_fused`` side branch and the packed codes do not change). Returns the layers merged."""
    layers = lora_layers(backbone)
    if not layers:
        raise ValueError("backbone has no LoRA layers to fuse")
    for layer in layers:
        layer.merge(adapter_names=None if adapter_names is None else list(adapter_names))
    return len(layers)


def set_lora_enabled(backbone: torch.nn.Module, enabled: bool) -> int:
    """Switch every LoRA branch on or off (peft ``enable_adapters``; the adapters stay loaded). Returns the layers."""
    layers = lora_layers(backbone)
    if not layers:
        raise ValueError("backbone has no LoRA layers")
    for layer in layers:
        layer.enable_adapters(bool(enabled))
    return len(layers)


def unfuse_lora(backbone: torch.nn.Module) -> int:
    """Undo :func:`fuse_lora` (peft ``unmerge`` subtracts the same deltas). Returns the layers unmerged."""
    layers = [m for m in lora_layers(backbone) if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def train_lora(
    pipe: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 60,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    p_uncond: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune the LoRA already on ``pipe.backbone`` (:func:`add_lora`) on ``images`` (``(N, C, H, W)`` in
    [-1, 1]) with class ``labels``: the DDPM ε-prediction loss (Ho et al. 2020, Eq. 14) under the pipeline's noise
    schedule, with classifier-free guidance's label dropout (``p_uncond`` of the labels become the null class; Ho &
    Salimans 2022), AdamW on the adapter's parameters only. Returns the loss of each step.

    ``pipe`` is a class-conditional pixel pipeline (``pipelines.DigitsPipeline``: ``backbone``, ``null_class``, and a
    scheduler config with the training betas and ``prediction_type="epsilon"``).
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    model = pipe.backbone
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not lora_layers(model):
        raise ValueError("pipe.backbone has no trainable LoRA: call add_lora(pipe.backbone, ...) first")
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_sched.config.prediction_type != "epsilon":
        raise ValueError(f"train_lora trains epsilon predictors; the scheduler says "
                         f"prediction_type={noise_sched.config.prediction_type!r}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    # eval mode: classifier-free label dropout is done below, from the seeded generator (diffusers' DiT label embedder
    # would otherwise drop labels again from the global RNG); LoRA dropout is 0
    model.eval()
    for _ in tqdm(range(steps), desc="LoRA fine-tune", disable=not progress):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < p_uncond] = pipe.null_class
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        with torch.enable_grad():
            pred = model(xt.to(device), t.to(device), class_labels=y.to(device)).sample
            loss = F.mse_loss(pred.float(), noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    logger.info("train_lora: %d steps, loss %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses
