"""Argument checks at the door of every public function: a ``TypeError`` for the wrong kind of value, a
``ValueError`` for a value out of range or not among the allowed ones. Each message names the argument, the value
it got and what is allowed, so the user never meets a failure deep inside torch or diffusers instead."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: Any) -> str:
    return f"got {_show(value)} ({type(value).__name__})"


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An ``int`` (or integral numpy scalar; never a bool or a float) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, {_got(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be an integer {' and '.join(s for s in (lo, hi) if s)}, got {value}")
    return value


def real(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
         finite: bool = True) -> float:
    """A real number (int or float, never a bool), finite unless ``finite=False``, within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, {_got(value)}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, {_got(value)}")
    return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, allowed))}, {_got(value)}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def module(name: str, value: Any) -> nn.Module:
    """A ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, {_got(value)}")
    return value


def function(name: str, value: Any) -> Callable:
    """Something callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, {_got(value)}")
    return value


def strings(name: str, value: Any, what: str = "string") -> tuple[str, ...] | None:
    """``None``, one string, or a sequence of strings, as a tuple (a string is one item, never its characters)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, dict)) or not isinstance(value, (Sequence, set, frozenset)):
        raise TypeError(f"{name} must be a {what} or a list of {what}s, {_got(value)}")
    out = tuple(value)
    bad = [g for g in out if not isinstance(g, str)]
    if bad:
        raise TypeError(f"{name} must hold {what}s only, got {_show(bad[0])} ({type(bad[0]).__name__}) "
                        f"in {_show(value)}")
    return out


def globs(name: str, value: Any) -> tuple[str, ...] | None:
    """Module-name globs: ``None``, one glob as a string, or a sequence of strings (``"mid_block*"`` is one glob,
    never seven one-character ones)."""
    return strings(name, value, "glob string")


def path(name: str, value: Any) -> str:
    """A file-system path: ``str`` or ``os.PathLike`` (never bytes, an open file or a model)."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), {_got(value)}")
    out = os.fspath(value)
    if not isinstance(out, str) or not out:
        raise ValueError(f"{name} must be a non-empty path, got {_show(value)}")
    return out


def directory(name: str, value: Any) -> str | None:
    """``None`` or an existing, writable directory (:func:`path` otherwise)."""
    if value is None:
        return None
    out = path(name, value)
    if not os.path.isdir(out):
        raise ValueError(f"{name} must be an existing directory, got {_show(value)}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{name} must be a directory this process can write to, got {_show(value)}")
    return out
