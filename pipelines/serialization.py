"""Save and load a diffusers pipeline whose backbone dmq quantized and froze.

The folder is an ordinary diffusers pipeline folder (``model_index.json``, one subfolder per component) except for
the backbone's subfolder, which holds ``config.json`` and ``dmq_model.safetensors`` (:func:`dmq.save`) instead of
float weights, and a ``dmq_pipeline.json`` that names the pipeline class and the backbone. Loading needs no
calibration data, no float backbone weights and no hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from diffusers import DiffusionPipeline

import dmq
from dmq.serialization import import_class

BACKBONES = ("transformer", "unet")
CHECKPOINT = "dmq_model.safetensors"
INFO = "dmq_pipeline.json"
PIPELINE_PACKAGES = ("diffusers.", "pipelines.")


def backbone_name(pipe: DiffusionPipeline) -> str:
    """The component that holds the denoising backbone: ``transformer`` or ``unet``."""
    for name in BACKBONES:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no backbone component; expected one of {BACKBONES}")


def save_quantized(pipe: DiffusionPipeline, directory: str | os.PathLike) -> Path:
    """Write ``pipe`` (its backbone frozen by :func:`dmq.freeze`) to ``directory``; returns the folder."""
    out = Path(directory)
    name = backbone_name(pipe)
    backbone = getattr(pipe, name)
    out.mkdir(parents=True, exist_ok=True)
    for comp_name, comp in pipe.components.items():
        if comp_name == name or comp is None:
            continue
        if not hasattr(comp, "save_pretrained"):
            raise ValueError(f"component {comp_name!r} ({type(comp).__name__}) has no save_pretrained")
        comp.save_pretrained(out / comp_name)
    pipe.save_config(out)
    (out / name).mkdir(exist_ok=True)
    if hasattr(backbone, "save_config"):
        backbone.save_config(out / name)
    dmq.save(backbone, out / name / CHECKPOINT)
    cls = type(pipe)
    info = {"format_version": 1, "pipeline_class": f"{cls.__module__}:{cls.__qualname__}", "backbone": name,
            "checkpoint": f"{name}/{CHECKPOINT}"}
    record = getattr(pipe, "dmq_calibration", None)
    if dataclasses.is_dataclass(record):  # what calibration saw, for `dmq info`
        info["calibration"] = dataclasses.asdict(record)
    (out / INFO).write_text(json.dumps(info, indent=2))
    return out


def load_quantized(directory: str | os.PathLike, pipeline_class: type | None = None) -> DiffusionPipeline:
    """Load a folder written by :func:`save_quantized`: the quantized backbone from its checkpoint, the other
    components with ``from_pretrained`` (local files only). ``pipeline_class`` overrides the saved class."""
    root = Path(directory)
    try:
        info = json.loads((root / INFO).read_text())
    except FileNotFoundError:
        raise ValueError(f"{root}: no {INFO}: not a folder written by pipelines.save_quantized") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{root / INFO}: not valid JSON ({e})") from None
    name = info.get("backbone")
    if name not in BACKBONES:
        raise ValueError(f"{root / INFO}: backbone must be one of {BACKBONES}, got {name!r}")
    backbone = dmq.load(root / info["checkpoint"])
    cls = pipeline_class or import_class(info["pipeline_class"], PIPELINE_PACKAGES)
    return cls.from_pretrained(root, local_files_only=True, **{name: backbone})

