"""The timestep context, timestep bins and the calibration-step selection policies.

A forward pre-hook on the top-level backbone reads the ``timestep`` argument of every call (positional or keyword,
scalar or per-sample) and publishes it in a context that every quantizer reads: activation quantizers pick their
timestep bin from it, and during calibration a :class:`StepPolicy` decides from it (never from a loop index)
whether the call is a calibration point.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dmq import validation as check

TIMESTEP_ARGS = ("timestep", "timesteps", "t")


class _Context:
    """Process-wide state of the running backbone call."""

    def __init__(self) -> None:
        self.timestep: torch.Tensor | None = None  # (B,) or (1,) float
        self.calibrating = False
        self.observe = True
        self.policy: StepPolicy | None = None
        self.points = 0  # calibration points seen in the current calibrate()


CONTEXT = _Context()


def timestep_bins(t: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Bin index of each timestep for ``bins`` equal bins over ``[lo, hi)``, clamped to ``0..bins-1``."""
    idx = torch.floor((t.double() - lo) / (hi - lo) * bins).long()
    return idx.clamp_(0, bins - 1)


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
def _timestep_position(model: nn.Module) -> tuple[str | None, int | None]:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None, None
    for name in TIMESTEP_ARGS:
        if name in params:
            return name, params.index(name)
    return None, None


def read_timestep(value: object) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value).detach()
    return t.reshape(-1).to("cpu", torch.float64)


class TimestepHook:
    """Forward pre-hook + hook on the top-level model that publish the call's timestep in :data:`CONTEXT`."""

    def __init__(self, model: nn.Module, lo: float, hi: float):
        self.name, self.pos = _timestep_position(model)
        self.lo, self.hi = lo, hi
        self.handles = [
            model.register_forward_pre_hook(self.pre, with_kwargs=True),
            model.register_forward_hook(self.post, always_call=True),
        ]

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = kwargs.get(self.name) if self.name in kwargs else None
        if value is None and self.pos is not None and len(args) > self.pos:
            value = args[self.pos]
        CONTEXT.timestep = read_timestep(value)
        if CONTEXT.calibrating:
            policy = CONTEXT.policy or AllSteps()
            CONTEXT.observe = policy.accept(CONTEXT.timestep, self.lo, self.hi)
            CONTEXT.points += int(CONTEXT.observe)

    def post(self, module: nn.Module, args: tuple, output: object) -> None:
        CONTEXT.timestep = None
        CONTEXT.observe = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
