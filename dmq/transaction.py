"""All-or-nothing model edits: a snapshot of everything dmq's verbs change on a model, and a rollback to it.

:func:`transaction` wraps :func:`dmq.quantize`, :func:`dmq.calibrate`, :func:`dmq.freeze`, :func:`dmq.load` and
``pipelines.quantize_pipeline``: if anything raises inside (``KeyboardInterrupt`` included), every module's
attributes, children, parameters, buffers and hooks are put back as they were, and the original exception propagates
unchanged.

What a snapshot holds, and why that is enough:

- every module reachable from the roots: its ``__dict__`` and the contents of every dict, list and set in it. Those
  are the registries (``_modules``, ``_parameters``, ``_buffers``, the hook dicts, ``_non_persistent_buffers_set``)
  and plain attributes. Registries are restored *in place*, so hook handles (which hold weak references to the hook
  dicts) stay valid. Module, parameter and buffer objects are kept by reference: swapped modules come back as the
  very same objects;
- dmq's own state objects reached from there (``model._dmq``, observers, timestep hooks): their ``__dict__`` and
  containers, and a copy of the tensors they hold (streaming statistics change in place);
- parameter and buffer *data*: each tensor's version counter, and a copy of the small ones (scales, biases, norms;
  below :data:`SMALL`) or of all of them (``clone_all=True``, for calibration runs whose PTQ methods fold
  transforms into the float weights). A large tensor changed in place without a copy cannot be restored; rollback
  then names it in a note on the exception (dmq's verbs never do that: the tests check it). Writes through
  ``tensor.data`` bypass the version counter: copied tensors are compared by value, large ones are not checked.

Objects of other libraries (accelerate hooks, attention processors, configs) are restored by reference, not copied:
dmq replaces them and never mutates them.

A step that must free a large tensor before it has succeeded (:func:`dmq.freeze`, each float weight once its layer
is packed) hands it to :meth:`Snapshot.spill`: its bytes go to an on-disk rollback journal (:mod:`dmq.journal`),
read back into the same object by a rollback, dropped when the snapshot is released.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dmq.journal import Journal

logger = logging.getLogger(__name__)

_ACTIVE = threading.local()  # the enclosing transactions that cover nested ones, per thread
SMALL = 1 << 16  # elements: parameters and buffers up to this size are copied by every snapshot
OWNED_PACKAGES = ("dmq.", "pipelines.")  # state objects whose insides a snapshot copies


_ATOMIC = frozenset({type(None), bool, int, float, str, bytes, torch.dtype, torch.device})


def _owned(obj: Any) -> bool:
    cls = type(obj)
    if isinstance(obj, (nn.Module, torch.Tensor, type)) or not hasattr(obj, "__dict__"):
        return False
    if not cls.__module__.startswith(OWNED_PACKAGES):
        return False
    return not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen)  # immutable: nothing to restore


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class Snapshot:
    """The restorable state of ``roots`` (modules, or any objects with a ``__dict__`` such as a pipeline: their
    attributes are restored, their module components walked)."""

    def __init__(self, *roots: Any, clone_all: bool = False):
        self._objects: list[tuple[Any, dict]] = []  # object -> its __dict__ (shallow)
        self._containers: list[tuple[Any, Any]] = []  # dict / list / set -> a shallow copy of its contents
        self._tensors: list[tuple[str, torch.Tensor, int | None, torch.Tensor | None]] = []
        self._seen: set[int] = set()
        self._uncopied: set[int] = set()  # large tensors kept by reference only: what spill may release
        self.journal: Journal | None = None
        self.clone_all = clone_all
        modules: list[tuple[str, nn.Module]] = []
        for i, root in enumerate(roots):
            if isinstance(root, nn.Module):
                modules += [(f"{i}:{n}", m) for n, m in root.named_modules(remove_duplicate=False)]
            else:
                self._capture_object(root)
                for attr, v in list(vars(root).items()):
                    if isinstance(v, nn.Module):
                        modules += [(f"{attr}.{n}".rstrip("."), m) for n, m in v.named_modules(remove_duplicate=False)]
        with torch.no_grad():
            for prefix, mod in modules:  # parameter and buffer data first: the owned-object pass skips them
                for kind in ("_parameters", "_buffers"):
                    for name, t in mod.__dict__.get(kind, {}).items():
                        if t is None or id(t) in self._seen:
                            continue
                        self._seen.add(id(t))
                        keep = t.detach().clone() if clone_all or t.numel() <= SMALL else None
                        if keep is None:
                            self._uncopied.add(id(t))
                        self._tensors.append((f"{prefix}.{name}", t, _version(t), keep))
            for _, mod in modules:
                self._capture_object(mod)
        self.modules = {id(m) for _, m in modules}

    # ---------------------------------------------------------------------------------------------- capture
    def _capture_object(self, obj: Any) -> None:
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        state = dict(vars(obj))
        self._objects.append((obj, state))
        for v in state.values():
            self._capture_value(v)

    def _capture_value(self, v: Any) -> None:
        if type(v) in _ATOMIC or isinstance(v, nn.Module) or id(v) in self._seen:
            return
        if isinstance(v, torch.Tensor):  # state of a dmq object (not a parameter or buffer, which are done)
            self._seen.add(id(v))
            self._tensors.append((type(v).__name__, v, _version(v), v.detach().clone()))
        elif isinstance(v, dict):
            self._seen.add(id(v))
            self._containers.append((v, dict(v)))
            for item in list(v.values()):
                self._capture_value(item)
        elif isinstance(v, (list, set)):
            self._seen.add(id(v))
            self._containers.append((v, set(v) if isinstance(v, set) else list(v)))
            for item in list(v):
                self._capture_value(item)
        elif isinstance(v, (tuple, frozenset)):
            for item in v:
                self._capture_value(item)
        elif _owned(v):
            self._capture_object(v)

    # ----------------------------------------------------------------------------------------------- spill
    def spill(self, t: torch.Tensor, directory: str | None = None) -> bool:
        """Free ``t`` (a large parameter or buffer this snapshot holds by reference) before the step ends: its bytes
        go to the rollback journal (a temporary file in ``directory``, default ``$TMPDIR``) and a rollback reads them
        back into the same object. Returns False, changing nothing, for a tensor the snapshot copied or never saw,
        or where the journal cannot be written."""
        if id(t) not in self._uncopied:
            return False
        if self.journal is None:
            self.journal = Journal(directory)
        if not self.journal.release(t):
            return False
        self._uncopied.discard(id(t))
        return True

    # --------------------------------------------------------------------------------------------- rollback
    def rollback(self) -> list[str]:
        """Put everything back; returns the names of tensors changed in place that could not be restored."""
        lost = []
        if self.journal is not None:  # first: the tensors spilled to disk get their storage back
            try:
                self.journal.restore()
            except Exception as e:  # noqa: BLE001 -- the original exception must reach the caller
                logger.error("rollback could not read the released tensors back from the journal: %s", e)
                lost.append(f"<{self.journal.nbytes} bytes of released weights: {e}>")
        for obj, state in self._objects:
            d = vars(obj)
            if d.keys() != state.keys() or any(d[k] is not v for k, v in state.items()):
                d.clear()
                d.update(state)
        for c, saved in self._containers:
            _restore_container(c, saved)
        with torch.no_grad():
            for name, t, version, keep in self._tensors:
                if keep is not None:  # compared by value too: writes through ``.data`` bypass the version counter
                    if t.device.type != "meta" and (_version(t) != version or not torch.equal(t, keep)):
                        t.copy_(keep)
                elif version is not None and _version(t) != version:
                    lost.append(name)
        if lost:
            logger.error("rollback could not restore %d tensor(s) changed in place: %s", len(lost), lost[:5])
        return lost

    def release(self) -> None:
        """Drop the references (the old modules and weights can be freed) and the rollback journal."""
        self._objects, self._containers, self._tensors, self.modules = [], [], [], set()
        self._uncopied = set()
        if self.journal is not None:
            self.journal.close()


def _restore_container(c: Any, saved: Any) -> None:
    if isinstance(c, dict):
        if c.keys() == saved.keys() and all(c[k] is v for k, v in saved.items()) and list(c) == list(saved):
            return
        c.clear()
        c.update(saved)
    elif isinstance(c, list):
        if len(c) != len(saved) or any(a is not b for a, b in zip(c, saved)):
            c[:] = saved
    elif c != saved:
        c.clear()
        c.update(saved)


def covering(module: nn.Module) -> Snapshot | None:
    """The innermost enclosing ``covers_nested`` transaction's snapshot that covers ``module``, or None: where a
    nested step's releases must go, since that snapshot is the one a later failure rolls back."""
    for s in reversed(getattr(_ACTIVE, "stack", [])):
        if id(module) in s.modules:
            return s
    return None


@contextmanager
def transaction(*roots: Any, clone_all: bool = False, covers_nested: bool = False) -> Iterator[Snapshot | None]:
    """Run the block on ``roots`` all or nothing: on any exception (``BaseException``) roll back, then re-raise the
    original exception unchanged.

    ``covers_nested=True`` promises that no exception raised inside the block is caught before it leaves the block:
    nested transactions on modules this one covers (with no stronger ``clone_all``) then take no snapshot of their
    own, since this one rolls back everything they touched."""
    enclosing = getattr(_ACTIVE, "stack", [])
    covered = roots and all(isinstance(r, nn.Module) and any(id(r) in s.modules and (s.clone_all or not clone_all)
                                                             for s in enclosing) for r in roots)
    if covered:
        yield None
        return
    snap = Snapshot(*roots, clone_all=clone_all)
    if covers_nested:
        _ACTIVE.stack = [*enclosing, snap]
    try:
        yield snap
    except BaseException as e:
        lost = snap.rollback()
        if lost:
            e.add_note(f"dmq could not roll back {len(lost)} tensor(s) changed in place: {lost[:5]}")
        raise
    finally:
        if covers_nested:
            _ACTIVE.stack = enclosing
        snap.release()
