"""Tiny replicas: the image group (see the package docstring)."""

from __future__ import annotations

from typing import Callable

from tests.pipelines.tiny_pipelines import Replica

BUILDERS: dict[str, Callable[[], Replica]] = {}
