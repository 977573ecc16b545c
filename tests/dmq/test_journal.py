"""dmq.journal: released tensors wait on disk, in a file with no name, and come back bit for bit into the very same
objects; the file is gone on close; a journal that cannot be written keeps the tensors in memory."""

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import dmq.journal as journal
from dmq.config import QuantSpec
from dmq.held_weight import held
from dmq.journal import Journal
from dmq.packed_weight import PackedWeight


def journal_files(directory: Path) -> list[str]:
    """Open files of this process in ``directory`` (a journal's file is unlinked: its link ends in "(deleted)")."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-8, 65504.0])
    return [
        nn.Parameter(torch.randn(3, 5, 7, generator=g).to(torch.bfloat16), requires_grad=False),
        torch.randn(6, 4, generator=g).t(),  # not contiguous: strides (1, 4)
        torch.randint(-128, 127, (33,), generator=g, dtype=torch.int8),
        special.to(torch.float16),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    ]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def test_released_tensors_come_back_bit_for_bit_into_the_same_objects(tmp_path):
    ts = _tensors()
    before = [(_bits(t), t.shape, t.stride(), t.dtype, t._version) for t in ts]
    j = Journal(tmp_path)
    assert j.closed and journal_files(tmp_path) == []
    for t in ts:
        assert j.release(t)
        assert t.numel() == 0 and t.untyped_storage().nbytes() == 0  # the memory is gone
    assert j.nbytes == sum(b.numel() for b, *_ in before)
    files = journal_files(tmp_path)
    assert len(files) == 1 and files[0].endswith("(deleted)") and list(tmp_path.iterdir()) == []  # no name
    assert os.fstat(j._file.fileno()).st_size == j.nbytes
    j.restore()
    for t, (bits, shape, stride, dtype, version) in zip(ts, before):
        assert (t.shape, t.stride(), t.dtype, t._version) == (shape, stride, dtype, version)
        assert torch.equal(_bits(t), bits)  # NaN, -0.0 and inf included
    assert isinstance(ts[0], nn.Parameter)
    j.close()
    assert j.closed and journal_files(tmp_path) == []  # the file is gone with its handle


def test_what_a_journal_cannot_hold_is_left_alone(tmp_path):
    j = Journal(tmp_path)
    meta, empty = torch.empty(4, 4, device="meta"), torch.empty(0)
    packed = held(torch.randn(8, 32), QuantSpec("int8", "channel"))
    assert isinstance(packed, PackedWeight)
    for t in (meta, empty, packed):
        assert not j.release(t)
    assert j.closed and j.nbytes == 0
    assert packed.qweight.shape == (8, 32)


@pytest.mark.parametrize("where", ["open", "write"])
def test_a_journal_that_cannot_be_written_keeps_the_tensors_in_memory(where, tmp_path, monkeypatch, caplog):
    if where == "open":
        def no_file(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(journal.tempfile, "TemporaryFile", no_file)
    else:
        real = journal.tempfile.TemporaryFile

        class Full:
            def __init__(self, *a, **k):
                self.f = real(*a, **k)

            def seek(self, *a):
                return self.f.seek(*a)

            def write(self, b):
                raise OSError(28, "No space left on device")

            def close(self):
                self.f.close()

        monkeypatch.setattr(journal.tempfile, "TemporaryFile", Full)
    ts = _tensors()
    bits = [_bits(t) for t in ts]
    j = Journal(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dmq.journal"):
        assert not any(j.release(t) for t in ts)
    assert [torch.equal(_bits(t), b) for t, b in zip(ts, bits)] == [True] * len(ts)
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1  # said once
    assert j.nbytes == 0
    j.restore()  # nothing to restore
    j.close()
    assert journal_files(tmp_path) == []
