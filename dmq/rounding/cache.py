"""A bounded cache of layer inputs, filled by running the calibration loop.

Each layer keeps a uniform reservoir sample (Vitter's algorithm R) of at most ``rows`` input rows over every
accepted backbone call, so all timesteps of the trajectory are represented. Rows are the layer's (transformed) input
vectors: tokens for a Linear, unfolded ``C·kh·kw`` patches for a Conv2d. Layers are captured in groups whose caches
fit ``budget_bytes``: one run of the loop per group, so memory is bounded by the budget, not by the model size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dmq.calibration import CONTEXT, layer_input
from dmq.spill import to_file

logger = logging.getLogger(__name__)


def layer_rows(module: nn.Module, x: torch.Tensor, max_samples: int, gen: torch.Generator) -> torch.Tensor:
    """The input rows ``(N, K)`` of ``module`` for input ``x`` (at most ``max_samples`` samples of the batch)."""
    x = module.transform_input(x.detach())
    if isinstance(module, nn.Conv2d):
        if x.shape[0] > max_samples:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_samples]]
        if module.padding_mode != "zeros":
            raise ValueError("input capture supports zero-padded convolutions only")
        cols = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream."""

    def __init__(self, size: int, gen: torch.Generator):
        self.size, self.gen, self.seen = size, gen, 0
        self.buf: torch.Tensor | None = None
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = rows.new_empty(self.size, rows.shape[1])
        free = min(self.size - self.n, rows.shape[0])
        if free:
            self.buf[self.n : self.n + free] = rows[:free]
            self.n += free
        rest = rows[free:]
        idx = torch.arange(self.seen + free, self.seen + rows.shape[0], dtype=torch.float64)
        self.seen += rows.shape[0]
        if rest.numel():
            j = (torch.rand(idx.shape, generator=self.gen, dtype=torch.float64) * (idx + 1)).long()
            keep = j < self.size
            self.buf[j[keep]] = rest[keep]

    def rows(self) -> torch.Tensor:
        return self.buf[: self.n] if self.buf is not None else torch.empty(0, 0)


def row_width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def capture_groups(modules: dict[str, nn.Module], rows: int, budget_bytes: float) -> list[list[str]]:
    """Consecutive groups of layers whose caches (``rows * K * 4`` bytes each) fit the budget."""
    groups, cur, size = [], [], 0
    for name, m in modules.items():
        b = rows * row_width(m) * 4
        if cur and size + b > budget_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += b
    if cur:
        groups.append(cur)
    return groups


def capture(model: nn.Module, run_loop: Callable[[], None], modules: dict[str, nn.Module], rows: int,
            seed: int = 0, max_samples: int = 4) -> dict[str, torch.Tensor]:
    """Run the loop once with pre-hooks on ``modules``; return each one's reservoir ``(N, K)``."""
    gen = torch.Generator().manual_seed(seed)
    res = {n: Reservoir(rows, gen) for n in modules}

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if CONTEXT.observe:  # the step policy accepted this backbone call
                res[name].add(layer_rows(mod, layer_input(args, kwargs), max_samples, gen))
        return pre

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_loop()
    finally:
        for h in handles:
            h.remove()
    return {n: r.rows() for n, r in res.items()}


class CacheStats:
    """What the reconstruction cache cost: passes of the loop and the peak bytes held."""

    def __init__(self) -> None:
        self.passes, self.peak_bytes = 0, 0


def iter_layer_inputs(model: nn.Module, run_loop: Callable[[], None], modules: dict[str, nn.Module], rows: int,
                      budget_bytes: float, stats: CacheStats | None = None, seed: int = 0
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, X)`` for every module, capturing group after group within ``budget_bytes``."""
    for k, group in enumerate(capture_groups(modules, rows, budget_bytes)):
        cache = capture(model, run_loop, {n: modules[n] for n in group}, rows, seed + k)
        if stats is not None:
            stats.passes += 1
            stats.peak_bytes = max(stats.peak_bytes, sum(x.numel() * x.element_size() for x in cache.values()))
        logger.debug("captured inputs of %d layers", len(group))
        for n in group:
            yield n, cache.pop(n)


class SpilledInputs:
    """Captured inputs of many layers, held until their layer is processed: the first ``budget_bytes`` in memory,
    the rest in file mappings (:func:`dmq.spill.to_file`), so that capturing every layer before rounding any costs
    disk, not memory."""

    def __init__(self, budget_bytes: float, directory: str | None = None):
        self.budget, self.directory = budget_bytes, directory
        self.resident = 0
        self._items: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (rows, resident bytes)

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def put(self, name: str, x: torch.Tensor) -> None:
        nbytes = x.numel() * x.element_size()
        if self.resident + nbytes > self.budget:
            mapped = to_file(x, self.directory)
            if mapped is not None:
                self._items[name] = (mapped, 0)
                return
        self.resident += nbytes
        self._items[name] = (x, nbytes)

    def take(self, name: str) -> torch.Tensor:
        x, nbytes = self._items.pop(name)
        self.resident -= nbytes
        return x
