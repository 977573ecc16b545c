"""A rollback journal on disk: tensors a step releases before it has succeeded, kept in a temporary file.

:func:`dmq.freeze` replaces each layer's float weight by its packed codes. Holding every float weight until the last
layer is packed, for the rollback, makes its peak the float model plus the packed one; releasing each one right after
its layer is packed keeps the peak at the float model plus one layer. What the rollback needs then lives on disk:
:meth:`Journal.release` writes the tensor's bytes to the journal file and empties the tensor in place (the same
``Parameter`` object, now with no storage); :meth:`Journal.restore` reads them back into that very object, bit for
bit, with its shape, strides and device. The file is unlinked as soon as it is created (it has no name, and the
system reclaims it even if the process is killed); :meth:`Journal.close` closes it, on success and on failure.

The file goes to ``directory`` (default: :func:`tempfile.gettempdir`, i.e. ``$TMPDIR``). Where it cannot be written
(no space, read-only), :meth:`Journal.release` keeps the tensor in memory and says so: the step still succeeds, at
the peak it had before.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    tensor: torch.Tensor  # the emptied tensor object, filled again on restore
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class Journal:
    """Released tensors, on disk until :meth:`restore` or :meth:`close`."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = directory
        self._file: BinaryIO | None = None
        self._entries: list[_Entry] = []
        self._failed = False  # the file could not be written: keep everything in memory from then on
        self.nbytes = 0

    @property
    def closed(self) -> bool:
        return self._file is None

    def release(self, t: torch.Tensor) -> bool:
        """Write ``t``'s bytes to the journal and free its storage (``t.data`` becomes an empty tensor). Returns
        False, leaving ``t`` as it is, where the journal cannot hold it (meta tensors, tensor subclasses, a file that
        cannot be written)."""
        if self._failed or t.device.type == "meta" or t.numel() == 0 or type(t.data) is not torch.Tensor:
            return False
        data = t.detach()
        flat = data.contiguous().reshape(-1).view(torch.uint8).cpu()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="dmq-rollback-", dir=self.directory)
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(memoryview(flat.numpy()))
            self._file.flush()
        except OSError as e:  # a full or read-only disk: the step goes on with this tensor in memory
            self._failed = True
            logger.warning("dmq: the rollback journal cannot be written (%s): the remaining float weights stay in "
                           "memory until the step succeeds", e)
            return False
        self._entries.append(_Entry(t, offset, flat.numel(), tuple(data.shape), tuple(data.stride()), data.dtype,
                                    data.device))
        self.nbytes += flat.numel()
        with torch.no_grad():
            t.data = torch.empty(0, dtype=data.dtype, device=data.device)  # no version bump: the snapshot's check
        return True

    def restore(self) -> None:
        """Put every released tensor back, bit for bit, into the same objects."""
        for e in reversed(self._entries):
            self._file.seek(e.offset)
            buf = bytearray(e.nbytes)
            if self._file.readinto(buf) != e.nbytes:
                raise OSError(f"rollback journal truncated at offset {e.offset}")
            flat = torch.frombuffer(buf, dtype=torch.uint8).view(e.dtype)
            out = torch.empty_strided(e.shape, e.stride, dtype=e.dtype, device=e.device)
            with torch.no_grad():
                out.copy_(flat.reshape(e.shape))
                e.tensor.data = out
        self._entries = []

    def close(self) -> None:
        """Drop the journal (its file is deleted with its last handle)."""
        if self._file is not None:
            self._file.close()
        self._file, self._entries = None, []
