"""Tiny instances of every diffusers backbone class in ``backbone_configs.json`` (small configs and dummy inputs
read from diffusers' own model tests by ``scripts/extract_backbone_configs.py``), for the module-level contract
sweep: ``dmq.quantize -> calibrate -> freeze`` on random tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

TABLE = json.loads((Path(__file__).with_name("backbone_configs.json")).read_text())


# smaller inputs for the classes whose test inputs make the sweep slow on CPU: {class: {input: shape}}, the
# shape of a random input or the leading length of a value input (batch 1 and a smaller latent)
SMALLER = {
    "UNetSpatioTemporalConditionModel": {"sample": [1, 2, 4, 16, 16], "added_time_ids": [1, 3],
                                         "encoder_hidden_states": [1, 1, 32]},
    "SD3Transformer2DModel": {"hidden_states": [1, 4, 16, 16], "encoder_hidden_states": [1, 16, 32],
                              "pooled_projections": [1, 64], "timestep": [1]},
    "UNet2DModel": {"sample": [1, 3, 32, 32], "timestep": [1]},
}


def names() -> list[str]:
    return sorted(TABLE)


def _decode(v: dict, gen: torch.Generator):
    if "randn" in v:
        return torch.randn(*v["randn"], generator=gen).to(getattr(torch, v["dtype"]))
    if "tensor" in v:
        return torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"]))
    if "list" in v:
        return [_decode(x, gen) for x in v["list"]]
    if "tuple" in v:
        return tuple(_decode(x, gen) for x in v["tuple"])
    if "dict" in v:
        return {int(k) if v["int_keys"] else k: _decode(x, gen) for k, x in v["dict"].items()}
    return v["value"]


def build(name: str, seed: int = 0) -> nn.Module | None:
    """The model with seeded random weights, or None if the installed diffusers lacks the class."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        return None
    torch.manual_seed(seed)
    model = cls(**TABLE[name]["init"]).eval()
    with torch.no_grad():  # zero-initialised output layers (adaLN-Zero, ...) would make every output 0
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def inputs(name: str, seed: int = 0) -> dict:
    """The dummy forward inputs (floating tensors redrawn from a seeded normal)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in TABLE[name]["inputs"].items():
        shape = SMALLER.get(name, {}).get(k)
        if shape is not None and "randn" in v:
            v = {**v, "randn": shape}
        x = _decode(v, gen)
        out[k] = x[: shape[0]] if shape is not None and "tensor" in v else x
    return out


def output(out) -> torch.Tensor:
    """The prediction of a forward's return value (``.sample``, a tuple's first item, or the tensor)."""
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, tuple):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)):  # one prediction per item (ControlNet residuals, per-sample lists)
        return torch.cat([output(o).flatten() for o in out])
    return out
