"""Tensors moved out of resident memory into a memory-mapped temporary file, with the same shape, dtype and values.

Learned rounding (:func:`dmq.rounding.reconstruct`) needs every layer's captured inputs and, until it has rounded a
layer, that layer's float weight. Held in memory, the captured inputs of a large model are several times its size,
and the float weights of the rounded layers plus their packed quantized weights and GPTQ's working set overshoot
the float model by 0.7x (DiT-XL/2, docs/memory.md). :func:`to_file` writes a tensor's bytes to a temporary file and
returns a private read-only-until-written mapping of it (``torch.from_file``): nothing of it is resident until it is
read, and what is read is dropped with the tensor (the file's pages belong to the page cache, not to the process).
A write goes to private copies of the written pages and never reaches the file.

The file is unlinked as soon as it is mapped: the system reclaims it with the last mapping, even if the process is
killed. Where the file cannot be written (no space, read-only directory), :func:`to_file` returns ``None`` and the
caller keeps the tensor in memory.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile

import torch
from torch import nn

logger = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # below this a tensor stays in memory: a mapping and a file per small tensor cost more than it
_MARK = "_dmq_spilled_weight"  # on a module: the data pointer of the weight release_weight mapped


def to_file(t: torch.Tensor, directory: str | os.PathLike | None = None) -> torch.Tensor | None:
    """A file-backed copy of the CPU tensor ``t`` (same shape, dtype and values, contiguous), or ``None`` where
    ``t`` is not a plain CPU tensor or the file cannot be written."""
    if t.device.type != "cpu" or type(t) is not torch.Tensor or t.numel() == 0 or t.is_sparse:
        return None
    flat = t.detach().contiguous().reshape(-1)
    fd, path = None, None
    try:
        fd, path = tempfile.mkstemp(prefix="dmq-spill-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(memoryview(flat.view(torch.uint8).numpy()))
        mapped = torch.from_file(path, shared=False, size=flat.numel(), dtype=flat.dtype)
    except (OSError, RuntimeError) as e:  # a full or read-only disk: the caller keeps the tensor in memory
        logger.warning("dmq: cannot write a temporary file in %s (%s): keeping %.1f MB in memory",
                       directory or tempfile.gettempdir(), e, flat.numel() * flat.element_size() / 2 ** 20)
        return None
    finally:
        if fd is not None:
            os.close(fd)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return mapped.view(t.shape)


@torch.no_grad()
def release_weight(module: nn.Module, directory: str | os.PathLike | None = None) -> bool:
    """Move ``module.weight``'s data to a file mapping, in place (the same ``Parameter`` object, the same values;
    no version bump, since nothing changed). Returns whether it moved: weights under :data:`MIN_BYTES`, off the
    CPU, non-contiguous, already moved by this function or of a tensor subclass stay where they are."""
    w = module._parameters.get("weight")
    if w is None or not w.is_contiguous() or w.numel() * w.element_size() < MIN_BYTES:
        return False
    if is_released(module, w):  # moved already (a repeated calibration)
        return False
    mapped = to_file(w.data, directory)
    if mapped is None:
        return False
    w.data = mapped
    module.__dict__[_MARK] = w.data_ptr()
    return True


def is_released(module: nn.Module, t: torch.Tensor) -> bool:
    """Whether ``t`` (``module``'s weight, or what it was) is the file mapping :func:`release_weight` made."""
    return t.numel() > 0 and module.__dict__.get(_MARK) == t.data_ptr()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``). A weight of a few MB freed
    inside the heap otherwise stays resident: the allocator keeps it for later requests that fit in its hole, and
    the larger working sets that follow (GPTQ's K x K matrices) do not, so the process keeps the float model's
    footprint after its weights are gone (measured: 2.35x instead of 1.70x on DiT-XL/2, docs/memory.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
