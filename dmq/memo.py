"""The last result of a pure function of one activation tensor, reused while that tensor lives unchanged.

In a transformer block the Q, K and V projections read the same tensor. A dynamic activation quantizer (NVFP4, MX,
per-token FP8) gives the same fake-quantized tensor for all three, and the tiled weight kernel casts that tensor to
its GEMM dtype for each. :class:`InputMemo` computes such a result once: it is keyed on the input tensor's
identity and version counter (an in-place change invalidates it) and on what else the result depends on, and it is
dropped as soon as the input is freed, so it never keeps an activation alive past its own lifetime.
``dmq.kernels.disable("input_memo")`` recomputes every time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

from dmq.formats.grid import DISABLED


class InputMemo:
    """One remembered ``fn(x)`` (see the module docstring); inference only: a tensor that needs a gradient, an
    inference-mode tensor (no version counter) or a ``torch.compile`` trace always recomputes."""

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref to x, x._version, key, result), replaced as a whole

    def get(self, x: torch.Tensor, key: Hashable, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if ("input_memo" in DISABLED or torch.compiler.is_compiling() or x.is_inference()
                or (x.requires_grad and torch.is_grad_enabled())):
            return fn(x)
        e = self._entry
        if e is not None and e[0]() is x and e[1] == x._version and e[2] == key:
            return e[3]
        out = fn(x)
        self._entry = (weakref.ref(x, self._drop), x._version, key, out)
        return out

    def _drop(self, ref: weakref.ref) -> None:
        e = self._entry
        if e is not None and e[0] is ref:
            self._entry = None
