"""What a pipeline folder holds (``dmq info``): components and their size on disk, what is quantized in which
formats, the packed size against the float size, the calibration record, and the sampler with its settings."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

import dmq
from pipelines.pipeline_folder import read_model_index
from pipelines.serialization import CALIBRATION

# scheduler settings worth showing; the rest of a scheduler config is the noise schedule
SAMPLER_KEYS = ("prediction_type", "timestep_spacing", "solver_order", "solver_type", "deis_method", "deis_order",
                "algorithm_type", "time_grid", "time_grid_power", "dc_order", "dc_ratios", "dc_variable", "shift",
                "flow_shift", "use_flow_sigmas", "use_karras_sigmas")


def _spec_name(spec: Any) -> str:
    if spec is None:
        return "full precision"
    parts = [spec.format, spec.granularity] + ([] if spec.symmetric else ["asymmetric"])
    if spec.granularity == "group":
        parts.append(f"g{spec.group_size}")
    if spec.dynamic:
        parts.append("dynamic")
    return " ".join(parts)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quantization_report(model: nn.Module) -> dict[str, Any]:
    """Formats and sizes of a model quantized by dmq: layer counts per weight and input format, attention matmuls,
    the Linear/Conv2d layers left in full precision, and :func:`dmq.weight_bytes`."""
    quantized, kept = [], []
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_spec"):
            quantized.append(mod)
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            kept.append(name)
    summary = dmq.summary(model)
    sizes = dmq.weight_bytes(model)
    # a packed layer's weight is counted from its layouts (its codes are not float parameters)
    params = int(sizes["quantized_params"]) + sum(
        p.numel() for mod in model.modules() for name, p in mod.named_parameters(recurse=False)
        if not (name == "weight" and getattr(mod, "weight_layouts", None)))
    return {
        "preset": summary["config"],
        "layers": len(quantized),
        "weights": dict(Counter(_spec_name(m.weight_spec) for m in quantized)),
        "inputs": dict(Counter(_spec_name(getattr(getattr(m, "input_quantizer", None), "spec", None))
                               for m in quantized)),
        "attention_matmuls": summary["attention"],
        "shortcut_splits": summary["shortcut_splits"],
        "full_precision_layers": kept,
        "parameters": params,
        "quantized_parameters": int(sizes["quantized_params"]),
        "bytes": {k: float(v) for k, v in sizes.items()},
        "float32_bytes": 4 * params,
    }


def describe_pipeline(directory: str | os.PathLike) -> dict[str, Any]:
    """A JSON-serialisable description of the pipeline folder ``directory``."""
    root = Path(directory)
    index = read_model_index(root)
    pipeline = index.get("_class_name")
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        components[name] = {"class": f"{entry[0]}.{entry[1]}", "disk_bytes": _disk_bytes(root / name)}
    out: dict[str, Any] = {
        "folder": str(root),
        "pipeline": pipeline[-1] if isinstance(pipeline, list) else pipeline,
        "components": components,
        "disk_bytes": _disk_bytes(root),
        "sampler": None,
        "quantized": None,
    }
    sched_file = root / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        sched = json.loads(sched_file.read_text())
        out["sampler"] = {"class": sched.get("_class_name"), **{k: sched[k] for k in SAMPLER_KEYS if k in sched}}
    for name in components:
        config_file = root / name / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("quantization_config", {}).get("quant_method") == "dmq":
            backbone = dmq.load(root / name)
            record = root / CALIBRATION
            out["quantized"] = {"backbone": name, "backbone_class": type(backbone).__name__,
                                **quantization_report(backbone),
                                "calibration": json.loads(record.read_text()) if record.is_file() else None}
            break
    return out
