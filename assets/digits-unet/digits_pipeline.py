"""A diffusers pipeline for the bundled class-conditional digit models (U-Net or DiT backbone, pixel space).

This file is self-contained (torch, numpy, PIL and diffusers only): saving a pipeline copies it into the folder and
names it in ``model_index.json`` as the folder's custom pipeline code, so that plain diffusers loads the folder with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and no import of dmq.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

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

    @property
    def num_classes(self) -> int:
        """Conditional classes, read from the backbone: the U-Net's embedding table has one extra row for the null
        class; the DiT's label embedder adds that row itself."""
        cfg = self.backbone.config
        return cfg.num_class_embeds - 1 if self.unet is not None else cfg.num_embeds_ada_norm

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch of classifier-free guidance."""
        return self.num_classes

    @classmethod
    def load_config(cls, *args, **kwargs):
        # The saved model_index names this file as custom code (for plain diffusers); loading through this class
        # must not detour through diffusers' remote-code path, which needs trust_remote_code and returns a copy
        # of the class, so the class name is read as a plain string here.
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return out

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        config["_class_name"] = [Path(__file__).stem, type(self).__name__]
        config.pop("_name_or_path", None)  # where it was loaded from: a path on someone's machine
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``model_index.json`` and a copy of this file, which it names as the pipeline's code."""
        os.makedirs(save_directory, exist_ok=True)
        target = Path(save_directory) / Path(__file__).name
        if not (target.exists() and target.samefile(__file__)):
            shutil.copyfile(__file__, target)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _labels(self, class_labels: Any) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if labels.min() < 0 or labels.max() > self.null_class:
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1} (or {self.null_class} for "
                             "unconditional)")
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
        model_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
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
