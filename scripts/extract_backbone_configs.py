"""Build ``tests/dmq/backbone_configs.json``: a small init config and the dummy forward inputs of every diffusers
backbone class, read from diffusers' own model tests (a checkout of its ``tests/`` folder, e.g. from
``git archive``).

Each test class of ``tests/models/{transformers,unets,controlnets}`` that defines ``get_init_dict`` /
``get_dummy_inputs`` (or the older ``prepare_init_args_and_inputs_for_common``) is instantiated, and its config and
inputs are recorded as data: the config verbatim, floating tensors by shape (the contract test draws them from a
seeded normal), integer and boolean tensors and timesteps by value. Run it with the checkout's root as the working
directory: ``cd /tmp/diffusers && python /path/to/dmq/scripts/extract_backbone_configs.py OUT.json``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import traceback
from pathlib import Path

import torch

FOLDERS = ("transformers", "unets", "controlnets")
# test configs made for other features (quantization back-ends, single-file loading, ...) carry full-size inputs
OTHER_FEATURES = ("Quant", "SDNQ", "GGUF", "BitsAndBytes", "BnB", "TorchAo", "ModelOpt", "SingleFile", "Compile",
                  "Lora", "LoRA", "Cache", "Offload", "Parallel", "IPAdapter", "Hub", "Memory", "Hotswap", "Nunchaku")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "guidance", "timestep_cond", "timestep_r")


def _encode(name: str, v):
    if isinstance(v, torch.Tensor):
        data = name in TIMESTEP_NAMES or "mask" in name or name.endswith("ids")  # values that carry meaning
        if v.is_floating_point() and not data and v.numel() > 64:
            return {"randn": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        return {"tensor": v.tolist(), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, (list, tuple)):
        items = [_encode(name, x) for x in v]
        return {"tuple" if isinstance(v, tuple) else "list": items} if all(i is not None for i in items) else None
    if isinstance(v, dict):
        items = {str(k): _encode(str(k), x) for k, x in v.items()}
        ok = all(i is not None for i in items.values())
        return {"dict": items, "int_keys": all(isinstance(k, int) for k in v)} if ok and v else None
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    return None


def _config(init: dict) -> dict:
    return json.loads(json.dumps(init, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _collect(cls) -> tuple[type, dict, dict] | None:
    obj = cls()
    if hasattr(obj, "get_init_dict") and hasattr(obj, "get_dummy_inputs"):
        init, inputs = obj.get_init_dict(), obj.get_dummy_inputs()
        model_cls = getattr(obj, "model_class", None)
    elif hasattr(obj, "prepare_init_args_and_inputs_for_common"):
        init, inputs = obj.prepare_init_args_and_inputs_for_common()
        model_cls = getattr(obj, "model_class", None)
    else:
        return None
    if model_cls is None or not isinstance(inputs, dict):
        return None
    return model_cls, init, inputs


def main(out: str) -> None:
    sys.path.insert(0, str(Path.cwd()))
    table: dict[str, dict] = {}
    for folder in FOLDERS:
        for path in sorted(Path("tests/models", folder).glob("test_*.py")):
            mod_name = ".".join(path.with_suffix("").parts)
            try:
                module = importlib.import_module(mod_name)
            except Exception as e:  # noqa: BLE001 - a test module this diffusers cannot import
                print(f"skip {mod_name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != mod_name or any(w in cls.__name__ for w in OTHER_FEATURES):
                    continue
                try:
                    got = _collect(cls)
                except Exception:  # noqa: BLE001
                    print(f"skip {mod_name}.{cls.__name__}: {traceback.format_exc(limit=1)}", file=sys.stderr)
                    continue
                if got is None:
                    continue
                model_cls, init, inputs = got
                name = model_cls.__name__
                enc = {k: _encode(k, v) for k, v in inputs.items()}
                if name in table or any(v is None for v in enc.values()):
                    continue
                table[name] = {"source": f"{mod_name}.{cls.__name__}", "init": _config(init), "inputs": enc}
    Path(out).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} backbone classes", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
