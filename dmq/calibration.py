"""Per-model timestep state, timestep bins and the calibration-step selection policies.

A forward pre-hook on the top-level backbone reads the ``timestep`` argument of every call (positional or keyword;
scalar, per-sample, per-token or per-frame, tensor or list) and makes it the *active call* of the running thread:
activation quantizers pick their timestep bin from it, and during calibration a :class:`StepPolicy` decides from it
(never from a loop index) whether the call is a calibration point.

The active call is thread-local (a :class:`threading.local`, which ``torch.compile`` traces), so it is private to a
thread: two
threads calling one quantized model, or two quantized models running at once, never see each other's timestep. What
belongs to the model (calibration mode, step policy, the timestep convention it receives) lives on a
:class:`ModelClock` on the model (``model._dmq.clock``), never in a process-wide global. :data:`CONTEXT` is a
read-only view of the running thread's active call.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dmq import validation as check

TIMESTEP_ARGS = ("timestep", "timesteps", "t")
logger = logging.getLogger(__name__)


class ModelClock:
    """What one quantized model knows about its timesteps and calibration mode (``model._dmq.clock``).

    ``range`` is where the timestep bins and the step policies are laid: the config's ``timestep_range`` (the
    scheduler's ``[0, num_train_timesteps)``) until the first calibration call shows the model's own convention.
    Flux-style flow models receive ``t / num_train_timesteps`` in ``[0, 1]``: a first calibration call whose
    timesteps all lie in ``[0, 1]`` while the range ends above 1 switches the range to ``[lo, hi] / hi``, so the bins
    split the interval the model really sees. ``observed`` is the ``(min, max)`` of the timesteps calibration saw.
    """

    def __init__(self, lo: float, hi: float):
        self.range = (float(lo), float(hi))
        self.latched = False
        self.calibrating = False
        self.policy: StepPolicy | None = None
        self.points = 0
        self.observed = (math.inf, -math.inf)
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ModelClock:
        new = ModelClock(*self.range)
        new.latched, new.observed = self.latched, self.observed
        return new

    def __getstate__(self) -> dict:
        return {"range": self.range, "latched": self.latched, "observed": self.observed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["range"])
        self.latched, self.observed = state["latched"], state["observed"]

    def see(self, t: torch.Tensor | None) -> bool:
        """Record a calibration call's timesteps; the first one fixes the convention (see the class docstring).
        Returns whether the range changed."""
        if t is None or t.numel() == 0:
            return False
        lo, hi = float(t.min()), float(t.max())
        with self.lock:
            self.observed = (min(self.observed[0], lo), max(self.observed[1], hi))
            if self.latched:
                return False
            self.latched = True
            r_lo, r_hi = self.range
            if not (r_hi > 1.0 and hi <= 1.0 and lo >= 0.0):
                return False
            self.range = (r_lo / r_hi, 1.0)
        logger.info("dmq: the model receives normalised timesteps (t=%.4g at the first calibration call): timestep "
                    "bins over [%.4g, 1]", hi, self.range[0])
        return True


@dataclass
class Call:
    """The active backbone call of a thread: its timesteps, whether it is observed, and the model's clock."""

    timestep: torch.Tensor | None = None  # (N, K) float64 on the CPU: N samples, K per-token/frame values
    calibrating: bool = False
    observe: bool = True
    clock: ModelClock | None = None
    prev: Call | None = None

    @property
    def range(self) -> tuple[float, float] | None:
        return None if self.clock is None else self.clock.range


_LOCAL = threading.local()  # thread-local, not a ContextVar: torch.compile traces attribute writes, not .set()


def active_call() -> Call | None:
    """The running thread's active backbone call (None outside any quantized model's forward)."""
    return getattr(_LOCAL, "call", None)


def _activate(call: Call | None) -> None:
    _LOCAL.call = call


@contextlib.contextmanager
def call_scope(*, calibrating: bool, observe: bool = True, timestep: torch.Tensor | None = None,
               clock: ModelClock | None = None) -> Iterator[Call]:
    """Make a call active in this thread for the ``with`` block (calibration passes that run submodules directly,
    e.g. block reconstruction's full-precision targets)."""
    prev = active_call()
    call = Call(timestep, calibrating, observe, clock, prev)
    _activate(call)
    try:
        yield call
    finally:
        _activate(prev)


class _ActiveView:
    """Read-only view of the running thread's active call: ``CONTEXT.calibrating``, ``.timestep``, ``.observe``."""

    @property
    def calibrating(self) -> bool:
        c = active_call()
        return c is not None and c.calibrating

    @property
    def timestep(self) -> torch.Tensor | None:
        c = active_call()
        return None if c is None else c.timestep

    @property
    def observe(self) -> bool:
        c = active_call()
        return c is None or c.observe

    @property
    def range(self) -> tuple[float, float] | None:
        c = active_call()
        return None if c is None else c.range


CONTEXT = _ActiveView()


def timestep_bins(t: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Bin index of each timestep for ``bins`` equal bins over ``[lo, hi)``, clamped to ``0..bins-1``."""
    idx = torch.floor((t.double() - lo) / (hi - lo) * bins).long()
    return idx.clamp_(0, bins - 1)


def sample_timesteps(t: torch.Tensor) -> torch.Tensor:
    """One timestep per sample from ``(N, K)`` per-token / per-frame timesteps: the largest (the noisiest token
    decides the activation range; Wan's clean first frame has t = 0 beside noisy frames)."""
    return t.amax(dim=1) if t.ndim == 2 else t.reshape(-1)


# --------------------------------------------------------------------------------------------- step policies
@dataclass(frozen=True)
class StepPolicy:
    """Which backbone calls count as calibration points. ``accept`` sees the call's true timesteps."""

    def reset(self) -> None:  # called at the start of calibrate()
        pass

    def accept(self, t: torch.Tensor | None, lo: float, hi: float) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class AllSteps(StepPolicy):
    """Every backbone call is a calibration point (Q-Diffusion with ``cali_st`` = all steps)."""

    def accept(self, t: torch.Tensor | None, lo: float, hi: float) -> bool:
        return True


@dataclass(frozen=True)
class UniformSteps(StepPolicy):
    """``n`` equal windows over the timestep range; in each sampling run the first call that lands in a window is
    a calibration point (Q-Diffusion's uniformly spaced calibration steps). A run starts again when the timestep
    increases."""

    n: int = 10
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check.integer("UniformSteps n", self.n, minimum=1)

    def reset(self) -> None:
        self._state.clear()

    def accept(self, t: torch.Tensor | None, lo: float, hi: float) -> bool:
        if t is None:
            return True
        tv = float(t.double().mean())
        if self._state.get("last") is not None and tv > self._state["last"]:
            self._state["taken"] = set()
        self._state["last"] = tv
        taken = self._state.setdefault("taken", set())
        w = int(timestep_bins(torch.tensor([tv]), self.n, lo, hi))
        if w in taken:
            return False
        taken.add(w)
        return True


@dataclass(frozen=True)
class NormalSteps(StepPolicy):
    """PTQ4DM's normal-distributed timestep sampling: a call at timestep ``t`` is a calibration point with
    probability ``pdf(u) / pdf(mu)``, ``u = (t - lo) / (hi - lo)``, ``pdf`` the density of ``N(mu, sigma)``.

    Unlike the PTQ4DM code (which labels the reverse-loop index as the timestep), ``u`` is the call's true
    normalised timestep: ``mu`` near 0 favours low-noise steps. Seeded, so reproducible.
    """

    mu: float = 0.4
    sigma: float = 0.4
    seed: int = 0
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check.real("NormalSteps mu", self.mu)
        if not check.real("NormalSteps sigma", self.sigma) > 0:
            raise ValueError(f"NormalSteps sigma must be > 0, got {self.sigma}")
        check.integer("NormalSteps seed", self.seed, minimum=0)

    def reset(self) -> None:
        self._state["gen"] = torch.Generator().manual_seed(self.seed)

    def accept(self, t: torch.Tensor | None, lo: float, hi: float) -> bool:
        if t is None:
            return True
        gen = self._state.get("gen") or self._state.setdefault("gen", torch.Generator().manual_seed(self.seed))
        u = (float(t.double().mean()) - lo) / (hi - lo)
        p = math.exp(-0.5 * ((u - self.mu) / self.sigma) ** 2)
        return bool(torch.rand((), generator=gen) < p)


def get_policy(policy: str | StepPolicy, name: str = "steps") -> StepPolicy:
    """``"all"``, ``"uniform"`` (10 windows), ``"normal"`` (PTQ4DM μ=σ=0.4) or a policy object; ``name`` is the
    argument named in errors."""
    if isinstance(policy, StepPolicy):
        return policy
    table = {"all": AllSteps, "uniform": UniformSteps, "normal": NormalSteps}
    if not isinstance(policy, str):
        raise TypeError(f"{name} must be one of {', '.join(table)} or a StepPolicy object, got "
                        f"{type(policy).__name__}")
    if policy not in table:
        raise ValueError(f"unknown step policy {policy!r} for {name}; valid: {', '.join(table)} or a StepPolicy "
                         "object")
    return table[policy]()


# --------------------------------------------------------------------------------------------- timestep hook
def timestep_argument(model: nn.Module) -> str | None:
    """The name of the forward argument that carries the timestep (None if there is none)."""
    return _timestep_position(model)[0]


def _timestep_position(model: nn.Module) -> tuple[str | None, int | None]:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None, None
    for name in TIMESTEP_ARGS:
        if name in params:
            return name, params.index(name)
    return None, None


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of a Linear / Conv2d call seen by a ``with_kwargs`` pre-hook: positional, or passed as ``input=``
    (AnimateDiff's motion modules call ``proj_in(input=x)``)."""
    return args[0] if args else kwargs["input"]


def read_timestep(value: object) -> torch.Tensor | None:
    """A call's timesteps as ``(N, K)`` float64 on the CPU: ``N`` samples (1 for a scalar) and ``K`` per-token or
    per-frame values (1 for one per sample). Lists and tuples (of numbers or tensors) are stacked per sample."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [read_timestep(v) for v in value]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if all(p.shape == parts[0].shape for p in parts):
            return torch.cat(parts, dim=1) if parts[0].shape[0] > 1 else torch.cat(parts).reshape(1, -1)
        return torch.cat([p.reshape(-1) for p in parts]).reshape(1, -1)  # ragged: one sample of all values
    if not isinstance(value, (torch.Tensor, int, float)):
        return None
    t = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if t.numel() == 0:
        return None
    return t.reshape(1, 1) if t.ndim == 0 else t.reshape(t.shape[0], -1)


class TimestepHook:
    """Forward pre-hook + hook on the top-level model that make each call, with its timesteps, the thread's active
    call (:func:`active_call`) for the duration of the forward, with the model's :class:`ModelClock`."""

    def __init__(self, model: nn.Module, lo: float, hi: float, clock: ModelClock | None = None):
        self.name, self.pos = _timestep_position(model)
        self.clock = clock if clock is not None else ModelClock(lo, hi)
        self.handles = [
            model.register_forward_pre_hook(self.pre, with_kwargs=True),
            model.register_forward_hook(self.post, always_call=True),
        ]

    @property
    def lo(self) -> float:
        return self.clock.range[0]

    @property
    def hi(self) -> float:
        return self.clock.range[1]

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = kwargs.get(self.name) if self.name in kwargs else None
        if value is None and self.pos is not None and len(args) > self.pos:
            value = args[self.pos]
        t = read_timestep(value)
        clock, observe = self.clock, True
        if clock.calibrating:  # the model's own mode: a quantized model nested in another keeps its own
            if clock.see(t):  # the model's timestep convention is now known: binned quantizers follow it
                for m in module.modules():
                    if getattr(m, "follows_clock", False):
                        m.timestep_range = clock.range
            with clock.lock:
                policy = clock.policy or AllSteps()
                observe = policy.accept(None if t is None else sample_timesteps(t), *clock.range)
                clock.points += int(observe)
        _activate(Call(t, clock.calibrating, observe, clock, active_call()))

    def post(self, module: nn.Module, args: tuple, output: object) -> None:
        call = active_call()
        if call is not None and call.clock is self.clock:
            _activate(call.prev)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
