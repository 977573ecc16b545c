"""Save and load a diffusers pipeline whose backbone dmq quantized and froze.

The folder is an ordinary diffusers pipeline folder (``model_index.json``, one subfolder per component) except for
the backbone's subfolder, which holds ``config.json`` and ``dmq_model.safetensors`` (:func:`dmq.save`) instead of
float weights, and a ``dmq_pipeline.json`` that names the pipeline class and the backbone. Loading needs no
calibration data, no float backbone weights and no hub.
"""

from __future__ import annotations

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


def quantized_components(pipe: DiffusionPipeline) -> list[str]:
    """The components dmq quantized (the denoisers; a weight-only text encoder too), backbone first."""
    names = [n for n, c in pipe.components.items() if getattr(c, "_dmq", None) is not None]
    return sorted(names, key=lambda n: (n not in BACKBONES, n))


def save_quantized(pipe: DiffusionPipeline, directory: str | os.PathLike) -> Path:
    """Write ``pipe`` (its quantized components frozen by :func:`dmq.freeze`) to ``directory``; returns the
    folder. Every quantized component (each denoiser of a multi-denoiser pipeline such as Wan 2.2) is written with
    :func:`dmq.save` into its subfolder."""
    out = Path(directory)
    names = quantized_components(pipe) or [backbone_name(pipe)]
    out.mkdir(parents=True, exist_ok=True)
    for comp_name, comp in pipe.components.items():
        if comp_name in names or comp is None:
            continue
        if not hasattr(comp, "save_pretrained"):
            raise ValueError(f"component {comp_name!r} ({type(comp).__name__}) has no save_pretrained")
        comp.save_pretrained(out / comp_name)
    pipe.save_config(out)
    for name in names:
        module = getattr(pipe, name)
        (out / name).mkdir(exist_ok=True)
        if hasattr(module, "save_config"):
            module.save_config(out / name)
        dmq.save(module, out / name / CHECKPOINT)
    cls = type(pipe)
    info = {"format_version": 1, "pipeline_class": f"{cls.__module__}:{cls.__qualname__}", "backbone": names[0],
            "checkpoint": f"{names[0]}/{CHECKPOINT}", "quantized": {n: f"{n}/{CHECKPOINT}" for n in names}}
    (out / INFO).write_text(json.dumps(info, indent=2))
    return out


def load_quantized(directory: str | os.PathLike, pipeline_class: type | None = None) -> DiffusionPipeline:
    """Load a folder written by :func:`save_quantized`: the quantized components from their checkpoints, the
    others with ``from_pretrained`` (local files only). ``pipeline_class`` overrides the saved class."""
    root = Path(directory)
    try:
        info = json.loads((root / INFO).read_text())
    except FileNotFoundError:
        raise ValueError(f"{root}: no {INFO}: not a folder written by pipelines.save_quantized") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{root / INFO}: not valid JSON ({e})") from None
    name = info.get("backbone")
    quantized = info.get("quantized", {name: info.get("checkpoint")})
    if not isinstance(quantized, dict) or not quantized or not all(
            isinstance(k, str) and isinstance(v, str) and "/" in v and ".." not in v for k, v in quantized.items()):
        raise ValueError(f"{root / INFO}: 'quantized' must map component names to checkpoint paths, got {quantized!r}")
    modules = {n: dmq.load(root / ckpt) for n, ckpt in quantized.items()}
    try:  # components saved as absent (a pipeline driven by prompt_embeds, without text encoders) stay absent
        index = json.loads((root / "model_index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    cls = pipeline_class or import_class(info["pipeline_class"], PIPELINE_PACKAGES)
    return cls.from_pretrained(root, local_files_only=True, **{**absent, **modules})
