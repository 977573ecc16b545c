"""Quantizing modules that accelerate offloads (``enable_sequential_cpu_offload``, ``device_map`` with offloaded
blocks).

Under offloading a module's weights sit on the ``meta`` device and an ``AlignDevicesHook`` (on the module itself or on
an ancestor with ``place_submodules=True``) loads them from its ``weights_map`` for each forward. Quantization needs
the real weights (to fake-quantize them) and replaces modules (which drops a hook attached to the old one). So:

1. :func:`materialize` loads every meta parameter from its hook's ``weights_map`` onto the CPU;
2. the caller quantizes;
3. :func:`reoffload` gives each replaced module an equivalent hook, puts the parameters back on ``meta`` and moves the
   new buffers (fake-quantized weights, activation scales) to the hook's execution device;
4. :func:`undo` puts the original (hooked) modules back after :func:`dmq.restore`, e.g. when calibration fails.

``enable_model_cpu_offload`` needs none of this: its hook sits on the whole backbone and moves it as a unit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook`` objects attached to ``module`` (directly or inside a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", [hook]))
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def _offloading_hook(model: nn.Module, param_name: str) -> tuple[str, object] | None:
    """``(module prefix, hook)`` of the nearest module that loads ``param_name`` from a weights map."""
    parts = param_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        mod = model.get_submodule(prefix) if prefix else model
        for h in _align_hooks(mod):
            if h.offload and h.weights_map is not None and (cut == len(parts) - 1 or h.place_submodules):
                return prefix, h
    return None


@dataclass
class OffloadRecord:
    """What :func:`materialize` changed, so that :func:`reoffload` / :func:`undo` can put it back."""

    meta_params: dict[str, tuple[str, object]] = field(default_factory=dict)  # param -> (hook module prefix, hook)
    hooked: dict[str, nn.Module] = field(default_factory=dict)  # module name -> original module (own hook)

    def __bool__(self) -> bool:
        return bool(self.meta_params)


def is_offloaded(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def materialize(model: nn.Module) -> OffloadRecord:
    """Load every offloaded (``meta``) parameter of ``model`` from its accelerate hook onto the CPU."""
    from accelerate.utils import set_module_tensor_to_device

    rec = OffloadRecord()
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        found = _offloading_hook(model, name)
        if found is None:
            raise ValueError(f"parameter {name!r} is on the meta device without an accelerate hook that loads it; "
                             "load the model's weights before quantizing")
        prefix, hook = found
        rel = name[len(prefix) + 1:] if prefix else name
        set_module_tensor_to_device(model, name, "cpu", value=hook.weights_map[rel])
        rec.meta_params[name] = (prefix, hook)
        owner = name.rpartition(".")[0]
        if owner == prefix and _align_hooks(model.get_submodule(owner) if owner else model):
            rec.hooked[owner] = model.get_submodule(owner) if owner else model
    logger.info("offloaded model: %d parameters loaded from accelerate's weights map for quantization",
                len(rec.meta_params))
    return rec


def reoffload(model: nn.Module, rec: OffloadRecord) -> None:
    """After quantization: hooks for replaced modules, parameters back to ``meta``, new buffers to the device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import set_module_tensor_to_device

    for name, original in rec.hooked.items():
        new = model.get_submodule(name) if name else model
        if new is original:
            continue
        old = _align_hooks(original)[0]
        # the replacement owns child quantizers: its hook places the whole subtree (scales and fake-quant weights
        # stay on the execution device; the float weights are loaded per call as before)
        params = {n: p.detach().to("cpu") for n, p in new.named_parameters()}
        buffers = {n: b for n, b in new.state_dict().items() if n not in params} if old.offload_buffers else {}
        hook = AlignDevicesHook(execution_device=old.execution_device, offload=True, io_same_device=old.io_same_device,
                                weights_map={**params, **buffers}, offload_buffers=old.offload_buffers,
                                place_submodules=True, skip_keys=old.skip_keys)
        add_hook_to_module(new, hook)
    for name, (prefix, hook) in rec.meta_params.items():
        owner = name.rpartition(".")[0]
        if owner in rec.hooked and model.get_submodule(owner) is not rec.hooked[owner]:
            continue  # the new hook already offloaded it
        set_module_tensor_to_device(model, name, "meta")
        dev = hook.execution_device
        if dev is not None and not hook.offload_buffers:
            mod = model.get_submodule(owner) if owner else model
            for bname, buf in mod.named_buffers():
                if buf.device != torch.device(dev):
                    set_module_tensor_to_device(mod, bname, dev)


def undo(model: nn.Module, rec: OffloadRecord) -> None:
    """After :func:`dmq.restore`: the original hooked modules back in place, their weights back on ``meta``."""
    from accelerate.utils import set_module_tensor_to_device

    for name, original in rec.hooked.items():
        if name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, original)
    for name in rec.meta_params:
        set_module_tensor_to_device(model, name, "meta")
