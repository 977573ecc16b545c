"""A diffusers pipeline for the bundled class-conditional digit models (U-Net or DiT backbone, pixel space)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.digits_data import NULL_CLASS, NUM_CLASSES

OUTPUT_TYPES = ("pil", "np", "pt")


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance.

    Exactly one backbone is set: ``unet`` (``UNet2DModel`` with a class embedding) or ``transformer``
    (``DiTTransformer2DModel``). Any diffusers scheduler works: the loop applies ``init_noise_sigma`` and
    ``scale_model_input``, and passes ``generator`` (and ``step_kwargs``) to ``step`` when it accepts them.
    """

    _optional_components = ["unet", "transformer"]

    def __init__(self, scheduler, unet=None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("DigitsPipeline needs exactly one backbone: unet or transformer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    def _labels(self, class_labels: Any) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if labels.min() < 0 or labels.max() > NULL_CLASS:
            raise ValueError(f"class_labels must lie in 0..{NUM_CLASSES - 1} (or {NULL_CLASS} for unconditional)")
        return labels

    def _step_kwargs(self, generator, step_kwargs: dict | None) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {"generator": generator} if "generator" in params else {}
        return {**kwargs, **(step_kwargs or {})}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        step_kwargs: dict | None = None,
        timesteps: list[int] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per label.

        Args:
            class_labels: digits 0..9, one per image (10 is the null class: unconditional samples).
            guidance_scale: classifier-free guidance weight; 1 runs the conditional model alone.
            num_inference_steps: sampler steps (ignored when ``timesteps`` is given).
            generator: one generator, or a list with one per image, so that a sample does not depend on its batch.
            latents: starting noise ``(N, C, H, W)`` instead of drawing it.
            output_type: ``"pil"`` (grayscale images), ``"np"`` (``N, H, W, C`` in [0, 1]) or ``"pt"``
                (``N, C, H, W`` in [0, 1]).
            step_kwargs: extra keyword arguments for ``scheduler.step`` (``eta`` for DDIM, say).
            timesteps: explicit timesteps for schedulers that accept them.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        model = self.backbone
        device, dtype = self._execution_device, model.dtype
        labels = self._labels(class_labels).to(device)
        n = labels.numel()
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image or a single one")
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (n, cfg.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype)

        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        model_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels
        extra = self._step_kwargs(generator, step_kwargs)

        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            tt = torch.as_tensor(t, device=device).reshape(1).expand(x.shape[0])
            out = model(x, tt, class_labels=model_labels).sample
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, **extra).prev_sample

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result: Any = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            result = arr if output_type == "np" else [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8))
                                                      for a in arr]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)
