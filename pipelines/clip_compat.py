"""Import clip-anytorch on any setuptools.

``clip/clip.py`` runs ``from pkg_resources import packaging`` only to compare torch versions. setuptools 70 dropped
``pkg_resources.packaging`` and setuptools 82 dropped ``pkg_resources`` itself, so the bare import fails on a
current environment. :func:`import_clip` provides the attribute (or a minimal module) from the ``packaging``
distribution before importing ``clip``; nothing else about the environment changes.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType


def _ensure_pkg_resources_packaging() -> None:
    import packaging
    import packaging.version

    try:
        import pkg_resources  # noqa: F401  (deprecated, absent on setuptools >= 82)
    except ImportError:
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    mod = sys.modules["pkg_resources"]
    if not hasattr(mod, "packaging"):
        mod.packaging = packaging  # type: ignore[attr-defined]


def import_clip() -> ModuleType:
    """The ``clip`` module of clip-anytorch, importable whatever the installed setuptools."""
    if "clip" in sys.modules and hasattr(sys.modules["clip"], "load"):
        return sys.modules["clip"]
    _ensure_pkg_resources_packaging()
    return importlib.import_module("clip")
