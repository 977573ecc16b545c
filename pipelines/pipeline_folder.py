"""A diffusers pipeline folder on disk: its model index, and the scheduler it loads with."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dmq import integrity


def read_model_index(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``model_index.json`` of the pipeline folder ``directory``; ``FileNotFoundError`` if it has none."""
    index_file = Path(directory) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a diffusers pipeline folder: no model_index.json in it")
    return json.loads(index_file.read_text())


def save_scheduler(scheduler: Any, directory: str | os.PathLike) -> Path:
    """Make ``scheduler`` the saved sampler of the pipeline folder ``directory``: its config goes to
    ``scheduler/scheduler_config.json`` and its class into ``model_index.json``, so that loading the folder builds
    it. A folder dmq sealed is verified first and sealed again after; each file is replaced whole."""
    root = Path(directory)
    index = read_model_index(root)
    sealed = (root / integrity.SEAL_FILE).is_file()
    if sealed:  # never re-seal a damaged folder: that would bless the damage
        integrity.verify_folder(root)
    index["scheduler"] = [type(scheduler).__module__.split(".")[0], type(scheduler).__name__]
    (root / "scheduler").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scheduler.save_pretrained(tmp)
        config = (Path(tmp) / "scheduler_config.json").read_text()
    integrity.atomic_write(root / "scheduler" / "scheduler_config.json", lambda p: Path(p).write_text(config))
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    integrity.atomic_write(root / "model_index.json", lambda p: Path(p).write_text(text))
    if sealed:
        integrity.seal_folder(root)
    return root / "scheduler"
