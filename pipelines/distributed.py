"""Seeded, sharded sample generation for evaluation, and the pipeline set-up the evaluation scripts share.

Sample ``i`` is drawn with its own ``torch.Generator().manual_seed(seeds[i])`` (a CPU generator, one per image), so
it does not depend on the batch it lands in, on the device, or on how many processes share the work. The sample
indices are split between processes with accelerate's ``split_between_processes`` (contiguous chunks, no padding);
per-sample results come back together with :func:`gather_indexed`, and metric states reduce across ranks in
torchmetrics' ``compute``.

Under ``torchrun`` on machines without CUDA, :func:`distributed_state` asks accelerate for its CPU mode, which starts
a gloo process group (plain ``PartialState()`` would give each CPU rank its own non-distributed state, and every rank
would then do all the work).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

import dmq
from pipelines.quantize import quantize_pipeline
from pipelines.sampler_swap import PASS_THROUGH, PLANNED, SAMPLERS, use_sampler

logger = logging.getLogger(__name__)

# dmq's own samplers (those not available yet raise a clear error) and quantization presets
DMQ_SAMPLERS = (*SAMPLERS, *PLANNED, *PASS_THROUGH)
QUANT_PRESETS = ("none", *dmq.preset_names())
CALIBRATION_SEED = 1_000_000  # calibration runs draw other noise than the evaluated samples


def distributed_state(cpu: bool | None = None) -> PartialState:
    """accelerate's process state; ``cpu=None`` picks CPU mode when CUDA is absent or ``ACCELERATE_USE_CPU`` is set."""
    if cpu is None:
        forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        cpu = forced or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def shard_indices(n: int, state: PartialState | None = None) -> list[int]:
    """This process's contiguous share of ``range(n)`` (the first ranks take the remainder; nothing is padded)."""
    state = state or distributed_state()
    with state.split_between_processes(list(range(n)), apply_padding=False) as mine:
        return list(mine)


def gather_indexed(indices: Sequence[int], values: Sequence[Any], state: PartialState | None = None) -> list[Any]:
    """Every rank's ``(index, value)`` pairs, on every rank, as one list ordered by index (duplicates dropped).

    Tensors should be on the CPU: they are pickled.
    """
    if len(indices) != len(values):
        raise ValueError(f"got {len(indices)} indices for {len(values)} values")
    state = state or distributed_state()
    pairs = list(zip((int(i) for i in indices), values))
    if state.num_processes > 1:
        pairs = gather_object(pairs)
    return [v for _, v in sorted(dict(pairs).items())]


def as_image_tensor(images: Any) -> torch.Tensor:
    """Pipeline output (``pt`` tensor, ``np`` array ``NHWC`` or PIL images) as float ``(N, C, H, W)`` in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        arr = torch.from_numpy(images).float()
        return (arr.unsqueeze(-1) if arr.ndim == 3 else arr).permute(0, 3, 1, 2)
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, Image.Image) for im in images):
        return torch.stack([torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).reshape(im.height, im.width, -1)
                            .permute(2, 0, 1) for im in images])
    raise TypeError(f"cannot read images of type {type(images).__name__}; expected a tensor, an array or PIL images")


def iter_samples(
    pipe: Any,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    batch_size: int,
    *,
    cond_arg: str = "class_labels",
    state: PartialState | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, images)`` batches of this process's share of the samples.

    Sample ``i`` gets ``conditions[i]`` (passed as ``cond_arg``: class labels, or ``"prompt"`` for text-to-image) and
    ``torch.Generator().manual_seed(seeds[i])``. ``images`` is float ``(B, C, H, W)`` in [0, 1].
    """
    if len(conditions) != len(seeds):
        raise ValueError(f"got {len(conditions)} conditions for {len(seeds)} seeds; pass one seed per sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = state or distributed_state()
    mine = shard_indices(len(seeds), state)
    span = f"{mine[0]}..{mine[-1]}" if mine else "none"
    logger.info("rank %d/%d generates %d samples (indices %s)", state.process_index, state.num_processes,
                len(mine), span)
    call_kwargs.setdefault("output_type", "pt")
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    for idx in tqdm(batches, desc=f"sampling (rank {state.process_index})", disable=not progress):
        cond = [conditions[i] for i in idx]
        generators = [torch.Generator().manual_seed(int(seeds[i])) for i in idx]
        out = pipe(**{cond_arg: cond}, generator=generators, **call_kwargs)
        yield idx, as_image_tensor(out.images if hasattr(out, "images") else out[0])


def generate_samples(
    pipe: Any, labels: Sequence[Any], seeds: Sequence[int], batch_size: int, **call_kwargs: Any
) -> tuple[list[int], torch.Tensor]:
    """This process's samples at once: ``(indices, images)``; see :func:`iter_samples` for the arguments."""
    indices: list[int] = []
    chunks: list[torch.Tensor] = []
    for idx, images in iter_samples(pipe, labels, seeds, batch_size, **call_kwargs):
        indices += idx
        chunks.append(images)
    return indices, (torch.cat(chunks) if chunks else torch.empty(0))


def load_pipeline(path: str | os.PathLike, *, allow_hub: bool = False, **kwargs: Any) -> Any:
    """A pipeline from a ``save_pretrained`` folder, quantized ones included (``import dmq`` registers the backend):
    ``DigitsPipeline`` for the bundled models, else diffusers' own.

    With ``allow_hub=False`` a path that is not a local folder raises ``FileNotFoundError`` (nothing is downloaded).
    ``kwargs`` go to ``from_pretrained`` (``torch_dtype=...``).
    """
    from diffusers import DiffusionPipeline

    from pipelines.digits_pipeline import DigitsPipeline

    folder = Path(path)
    if not folder.is_dir():
        if not allow_hub:
            raise FileNotFoundError(f"pipeline folder {str(path)!r} does not exist (expected a save_pretrained folder"
                                    " with model_index.json; the bundled ones are made by scripts/train_digits.py)")
        logger.info("%s is not a local folder: loading it as a Hugging Face hub id", path)
        return DiffusionPipeline.from_pretrained(str(path), **kwargs)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: {str(path)!r} is not a diffusers pipeline folder")
    class_name = json.loads(index.read_text()).get("_class_name")
    if isinstance(class_name, list):  # [code file, class]: a folder that carries its own pipeline code
        class_name = class_name[-1]
    if class_name == DigitsPipeline.__name__:
        return DigitsPipeline.from_pretrained(str(folder), **kwargs)
    return DiffusionPipeline.from_pretrained(str(folder), **kwargs)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``; ``ValueError`` for unknown names."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"unknown scheduler {name!r}: expected one of dmq's samplers {sorted(SAMPLERS)} or a "
                         "diffusers scheduler class name such as DDIMScheduler, DPMSolverMultistepScheduler, "
                         "UniPCMultistepScheduler or EulerDiscreteScheduler")
    return cls


def check_sampler_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of dmq's available samplers or a diffusers scheduler class."""
    key = name.lower()
    if key in PLANNED:
        raise ValueError(f"sampler {name!r} is not available yet; available: {sorted(SAMPLERS)} or a diffusers "
                         "scheduler class name")
    if key not in SAMPLERS and key not in PASS_THROUGH:
        scheduler_class(name)


def set_sampler(pipe: Any, name: str | None) -> str:
    """Swap ``pipe.scheduler`` for dmq's sampler ``name`` (``"deis"``, see :func:`pipelines.use_sampler`) or the
    diffusers scheduler class ``name``, built ``from_config``; returns its name. ``None`` or ``"default"`` keeps the
    pipeline's scheduler."""
    if name in (None, "default"):
        return type(pipe.scheduler).__name__
    check_sampler_name(name)
    if name.lower() in SAMPLERS or name.lower() in PASS_THROUGH:
        use_sampler(pipe, name)
        return name.lower()
    pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)
    return name


def apply_quant_preset(pipe: Any, preset: str, *, prompts: Sequence[str] | None = None,
                       call_kwargs: Sequence[dict] | None = None, num_inference_steps: int = 20,
                       guidance_scale: float | None = None, progress: bool = True) -> None:
    """Quantize the pipeline's backbone with a named preset through :func:`pipelines.quantize_pipeline`,
    calibrating on ``prompts`` or ``call_kwargs`` (under a process group each rank runs its share and the
    statistics are all-reduced). ``"none"`` keeps full precision; ``pipe=None`` only checks the name."""
    if preset == "none":
        return
    if preset not in QUANT_PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}; available: {', '.join(QUANT_PRESETS)}")
    if pipe is None:
        return
    quantize_pipeline(pipe, preset, prompts=prompts, call_kwargs=call_kwargs, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, seed=CALIBRATION_SEED, progress=progress)
