"""Checkpoint integrity: atomic writes and a digest over the metadata as well as every tensor.

Two levels, for any writer and reader of dmq checkpoints:

- one safetensors file: :func:`seal` adds a metadata entry ``"dmq_integrity"`` holding each tensor's dtype, shape and
  sha256, and one sha256 over all other metadata entries plus that table; :func:`verify` checks both and raises
  ``ValueError`` naming what is damaged. A changed value in the quantization map, a renamed, dropped or retyped
  tensor, or a flipped bit anywhere fails. :func:`verify_metadata` checks the header before any tensor is read;
- a folder (diffusers ``save_pretrained`` layout: ``config.json``, sharded safetensors and their index):
  :func:`seal_folder` writes ``dmq_integrity.json`` with the sha256 of every file and a digest over that list;
  :func:`verify_folder` checks it.

Writes are atomic: :func:`atomic_write` writes a temporary file in the target's folder, flushes it to disk
(``fsync``) and renames it over the target, so a writer killed at any point leaves either the previous file or the
new one, never a mixture (a stray ``.<name>.*.tmp`` may remain). :func:`atomic_directory` does the same for a
folder: it is filled under a temporary name and swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux (two
renames elsewhere, with the previous folder kept as ``.<name>.*.old`` if the process dies between them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

_logger = logging.getLogger(__name__)

SEAL_KEY = "dmq_integrity"
SEAL_FILE = "dmq_integrity.json"
VERSION = 1


# --------------------------------------------------------------------------------------------------- digests
def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (row-major, its own dtype)."""
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(b.numpy()) if b.numel() else b"").hexdigest()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _record_digest(metadata: Mapping[str, str], table: dict) -> str:
    rest = {k: v for k, v in metadata.items() if k != SEAL_KEY}
    return hashlib.sha256(_canonical({"metadata": rest, "tensors": table})).hexdigest()


def seal(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``metadata`` plus the ``"dmq_integrity"`` entry for ``tensors``: pass the result as the file's metadata."""
    if SEAL_KEY in metadata:
        raise ValueError(f"metadata key {SEAL_KEY!r} is reserved for the integrity seal")
    table = {k: {"dtype": _dtype(t), "shape": list(t.shape), "sha256": tensor_digest(t)} for k, t in tensors.items()}
    entry = {"version": VERSION, "tensors": table, "digest": _record_digest(metadata, table)}
    return {**metadata, SEAL_KEY: json.dumps(entry)}


def verify_metadata(metadata: Mapping[str, str] | None, names: Iterable[str], source: object) -> dict:
    """Check the metadata against its digest and the tensor names against the seal, before any tensor data is read
    (a damaged header fails fast); returns the seal's tensor table for :func:`verify_tensors`."""
    metadata = metadata or {}
    if SEAL_KEY not in metadata:
        raise ValueError(f"{source}: no {SEAL_KEY!r} entry in the metadata: not written by this dmq version, or "
                         "the header is damaged")
    try:
        entry = json.loads(metadata[SEAL_KEY])
        version, table, digest = entry["version"], entry["tensors"], entry["digest"]
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise TypeError("the tensor table is not a mapping of records")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{source}: the integrity seal is unreadable ({e}): the header is damaged") from None
    if version != VERSION:
        raise ValueError(f"{source}: integrity seal version {version!r}, this dmq reads {VERSION}")
    if _record_digest(metadata, table) != digest:
        raise ValueError(f"{source}: the metadata (quantization map or tensor table) does not match its digest: "
                         "the header was edited or damaged")
    for k in sorted(set(table) ^ set(names)):
        raise ValueError(f"{source}: tensor {k!r} is {'missing from the file' if k in table else 'not in the seal'}")
    return table


def verify_tensors(table: dict, tensors: Mapping[str, torch.Tensor], source: object) -> None:
    """Check each tensor's dtype, shape and sha256 against the table :func:`verify_metadata` returned."""
    for k in sorted(set(table) ^ set(tensors)):
        raise ValueError(f"{source}: tensor {k!r} is {'missing from the file' if k in table else 'not in the seal'}")
    for k, t in tensors.items():
        rec = table[k]
        if rec.get("dtype") != _dtype(t) or rec.get("shape") != list(t.shape):
            raise ValueError(f"{source}: tensor {k!r} is {_dtype(t)} {list(t.shape)}, the seal says "
                             f"{rec.get('dtype')} {rec.get('shape')}: the file is damaged")
        if rec.get("sha256") != tensor_digest(t):
            raise ValueError(f"{source}: tensor {k!r} does not match its sha256 digest: the file is damaged")


def verify(metadata: Mapping[str, str] | None, tensors: Mapping[str, torch.Tensor], source: object) -> None:
    """Check a file's metadata and tensors against its seal; ``ValueError`` naming ``source`` and what is wrong."""
    verify_tensors(verify_metadata(metadata, tensors.keys(), source), tensors, source)


# ------------------------------------------------------------------------------------------------- targets
def check_target(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """``path`` as a writable target: its parent folder exists, and it is not a folder (or, with ``folder=True``,
    not a file). ``ValueError`` naming the path otherwise."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(target)!r}: the folder {str(parent)!r} does not exist")
    if not folder and target.is_dir():
        raise ValueError(f"cannot write {str(target)!r}: it is a folder; give a file path")
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"cannot write the folder {str(target)!r}: a file of that name exists")
    return target


def check_source(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """``path`` as a readable file (or folder): ``ValueError`` naming it if missing or of the other kind."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"{str(source)!r} does not exist")
    if folder != source.is_dir():
        raise ValueError(f"{str(source)!r} is {'a file' if folder else 'a folder'}; expected "
                         f"{'a folder' if folder else 'a file'}")
    return source


# ---------------------------------------------------------------------------------------------- atomic writes
def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        if not directory:
            raise
    finally:
        os.close(fd)


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``path``: the file is replaced whole or not at all."""
    target = check_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the file the mode a plain open() would
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(target.parent, directory=True)
    return target


def canonical_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its metadata entries in sorted order, in place and at the same
    length. safetensors keeps the metadata in a hash map whose order changes from one process and call to the next,
    so without this two saves of the same model differ in their bytes (and "the old file or the new one" could not
    be told by content)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n), object_pairs_hook=dict)
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # a serializer escaping differently than json: leave the (valid) header as written
            _logger.debug("%s: header not canonicalized (%d > %d bytes)", path, len(text), n)
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Fill the yielded temporary folder; on success it is sealed (:func:`seal_folder`) and replaces ``path``.
    Missing parent folders are created, as ``save_pretrained`` does."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the folder {str(path)!r}: cannot create its parent folder "
                         f"({e.strerror or e})") from None
    target = check_target(path, folder=True)
    if target.is_dir() and any(target.iterdir()) and not (target / SEAL_FILE).is_file():
        raise ValueError(f"cannot write the folder {str(target)!r}: it exists and is not a folder written by dmq "
                         f"(no {SEAL_FILE}); replacing it would delete its files. Give a new or empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*.safetensors"):  # diffusers' shards too: the same model gives the same bytes
            canonical_header(f)
        seal_folder(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp, directory=True)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the previous folder
        elif target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent, directory=True)


# ------------------------------------------------------------------------------------------------- folders
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != SEAL_FILE and not p.name.startswith("."))


def seal_folder(folder: str | os.PathLike) -> None:
    """Write ``dmq_integrity.json``: the sha256 of every file under ``folder`` and a digest over that list."""
    root = Path(folder)
    files = {name: file_digest(root / name) for name in _files(root)}
    entry = {"version": VERSION, "files": files, "digest": hashlib.sha256(_canonical(files)).hexdigest()}
    text = json.dumps(entry, indent=1)
    atomic_write(root / SEAL_FILE, lambda tmp: Path(tmp).write_text(text))


def verify_folder(folder: str | os.PathLike) -> None:
    """Check every file under ``folder`` against ``dmq_integrity.json``; ``ValueError`` naming the first file that
    is missing, unexpected or changed."""
    root = check_source(folder, folder=True)
    try:
        entry = json.loads((root / SEAL_FILE).read_text())
        files, digest = entry["files"], entry["digest"]
        if not isinstance(files, dict):
            raise TypeError("the file table is not a mapping")
    except FileNotFoundError:
        raise ValueError(f"{str(root)!r}: no {SEAL_FILE}: not a folder written by dmq") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(root / SEAL_FILE)!r} is damaged ({e})") from None
    if hashlib.sha256(_canonical(files)).hexdigest() != digest:
        raise ValueError(f"{str(root / SEAL_FILE)!r} does not match its digest: it was edited or damaged")
    for name in sorted(set(files) ^ set(_files(root))):
        raise ValueError(f"{str(root)!r}: file {name!r} is {'missing' if name in files else 'not in the seal'}")
    for name, want in files.items():
        if file_digest(root / name) != want:
            raise ValueError(f"{str(root)!r}: file {name!r} does not match its sha256 digest: it is damaged")


def verify_sealed_parent(file: str | os.PathLike) -> Path | None:
    """:func:`verify_folder` on the sealed folder ``file`` belongs to: its own folder (a model) or, for a
    component of a pipeline (``model_index.json`` one level up), the pipeline's; returns it, or None if unsealed."""
    folder = Path(file).resolve().parent
    for root in (folder, folder.parent):
        if (root / SEAL_FILE).is_file() and (root == folder or (root / "model_index.json").is_file()):
            verify_folder(root)
            return root
    return None
