"""Save and load a diffusers pipeline whose backbone dmq quantized and froze: thin conveniences over diffusers.

A frozen diffusers backbone is a dmq-quantized diffusers model (:mod:`dmq.backend`), so the pipeline folder is an
ordinary diffusers pipeline folder: ``pipe.save_pretrained(dir)`` writes it (the backbone's ``config.json`` carries
``quantization_config``, its safetensors the packed weights and the quantization map) and
``DiffusionPipeline.from_pretrained(dir)`` reads it after ``import dmq``. These two functions add only the checks,
and the lookup of this package's own pipeline classes (``DigitsPipeline``), which diffusers cannot resolve by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

import dmq  # noqa: F401 -- registers quant_method="dmq" with diffusers
from dmq import integrity
from dmq.serialization import realign

BACKBONES = ("transformer", "unet")
CALIBRATION = "dmq_calibration.json"  # the calibration record of pipe.dmq_calibration, beside model_index.json


def backbone_name(pipe: DiffusionPipeline) -> str:
    """The component that holds the denoising backbone: ``transformer`` or ``unet``."""
    for name in BACKBONES:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no backbone component; expected one of {BACKBONES}")


def save_quantized(pipe: DiffusionPipeline, directory: str | os.PathLike, **save_kwargs) -> Path:
    """Write ``pipe`` (its backbone frozen by :func:`dmq.freeze`) with ``pipe.save_pretrained``; returns the folder.
    ``save_kwargs`` go to ``save_pretrained`` (``max_shard_size``, ...)."""
    backbone = getattr(pipe, backbone_name(pipe))
    st = getattr(backbone, "_dmq", None)
    if st is None or not st.packed:
        raise ValueError("the pipeline's backbone is not a frozen dmq model: dmq.quantize, dmq.calibrate and "
                         "dmq.freeze it (or load it with a DmqConfig) before save_quantized")
    out = Path(directory)
    # filled under a temporary name, sealed (every file of every component) and swapped in whole
    with integrity.atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        record = getattr(pipe, "dmq_calibration", None)
        if dataclasses.is_dataclass(record):  # what calibration saw, for `dmq info`
            (Path(tmp) / CALIBRATION).write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return out


def resolve_pipeline_class(directory: str | os.PathLike) -> type:
    """The pipeline class named in ``model_index.json``: a diffusers class or one of this package's."""
    import pipelines

    root = Path(directory)
    try:
        name = json.loads((root / "model_index.json").read_text())["_class_name"]
    except FileNotFoundError:
        raise ValueError(f"{root}: no model_index.json: not a diffusers pipeline folder") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{root / 'model_index.json'}: not a pipeline index ({e})") from None
    if isinstance(name, list):  # [code file, class]: a folder that carries its pipeline code (DigitsPipeline)
        name = name[-1]
    cls = getattr(diffusers, name, None) or getattr(pipelines, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ValueError(f"{root}: pipeline class {name!r} is neither a diffusers nor a dmq pipeline")
    return cls


def load_quantized(directory: str | os.PathLike, pipeline_class: type | None = None, **kwargs) -> DiffusionPipeline:
    """Load a pipeline folder with a dmq-quantized backbone (local files only); ``pipeline_class`` overrides the
    saved class, ``kwargs`` go to ``from_pretrained``."""
    root = Path(directory)
    if pipeline_class is not None and not (isinstance(pipeline_class, type)
                                           and issubclass(pipeline_class, DiffusionPipeline)):
        raise TypeError(f"pipeline_class must be a DiffusionPipeline subclass, got {type(pipeline_class).__name__}")
    cls = pipeline_class or resolve_pipeline_class(root)
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        index = {}  # from_pretrained says what is wrong with the folder
    # components saved as absent (a pipeline driven by prompt_embeds, without text encoders) stay absent
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipe = cls.from_pretrained(root, local_files_only=True, **{**absent, **kwargs})
    for component in pipe.components.values():  # the VAE and text encoders too, not only the quantized backbone
        if isinstance(component, torch.nn.Module):
            realign(component)
    return pipe
