"""A diffusers pipeline folder on disk: its model index, and the scheduler it loads with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_model_index(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``model_index.json`` of the pipeline folder ``directory``; ``FileNotFoundError`` if it has none."""
    index_file = Path(directory) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a diffusers pipeline folder: no model_index.json in it")
    return json.loads(index_file.read_text())


def save_scheduler(scheduler: Any, directory: str | os.PathLike) -> Path:
    """Make ``scheduler`` the saved sampler of the pipeline folder ``directory``: its config goes to
    ``scheduler/scheduler_config.json`` and its class into ``model_index.json``, so that loading the folder builds
    it."""
    root = Path(directory)
    index = read_model_index(root)
    scheduler.save_pretrained(root / "scheduler")
    index["scheduler"] = [type(scheduler).__module__.split(".")[0], type(scheduler).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root / "scheduler"
