"""dmq.spill: tensors moved into file mappings keep their shape, dtype and bits; the file has no name; a write stays
private; a directory that cannot be written keeps the tensor in memory. End to end: learned rounding with every
captured input and every rounded float weight spilled gives the same model, bit for bit, and leaves no mapping
behind once frozen."""

import gc
import logging

import pytest
import torch
from torch import nn

import dmq
import dmq.spill as spill
from tests.dmq.helpers import backbone_loop, tiny_dit


def spill_maps(directory=None) -> list[str]:
    """This process's file mappings made by dmq.spill (in ``directory`` if given)."""
    with open("/proc/self/maps") as f:
        return [ln for ln in f if "dmq-spill-" in ln and (directory is None or str(directory) in ln)]


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-8, 65504.0])
    return [
        torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        torch.randn(6, 4, generator=g).t(),  # not contiguous: the copy is
        torch.randint(-128, 127, (33,), generator=g, dtype=torch.int8),
        special.to(torch.float16),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    ]


def test_a_spilled_tensor_keeps_its_bits_and_its_file_has_no_name(tmp_path):
    for t in _tensors():
        m = spill.to_file(t, tmp_path)
        assert m.shape == t.shape and m.dtype == t.dtype and m.is_contiguous()
        assert torch.equal(m.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))
        assert list(tmp_path.iterdir()) == []  # unlinked at once
        assert spill_maps(tmp_path) and all(ln.rstrip().endswith("(deleted)") for ln in spill_maps(tmp_path))
    del m
    gc.collect()
    assert spill_maps(tmp_path) == []  # each mapping goes with its tensor


def test_a_write_to_the_mapping_is_private(tmp_path):
    t = torch.arange(1 << 12, dtype=torch.float64)
    a, b = spill.to_file(t, tmp_path), spill.to_file(t, tmp_path)
    a.add_(1.0)
    assert torch.equal(a, t + 1.0) and torch.equal(b, t)


def test_a_directory_that_cannot_be_written_keeps_the_tensor_in_memory(tmp_path, monkeypatch, caplog):
    t = torch.randn(64, 64)

    class FullDisk:
        def __init__(self, fd, mode):
            self.f = open(fd, mode)  # noqa: SIM115 -- closed in __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill.os, "fdopen", FullDisk)
    with caplog.at_level(logging.WARNING, logger="dmq.spill"):
        assert spill.to_file(t, tmp_path) is None
    assert "No space left" in caplog.text and str(tmp_path) in caplog.text
    assert list(tmp_path.iterdir()) == []  # the half-written file is removed

    lin = nn.Linear(64, 64)
    before = lin.weight.detach().clone()
    monkeypatch.setattr(spill, "MIN_BYTES", 0)
    assert not spill.release_weight(lin, tmp_path)
    assert torch.equal(lin.weight, before) and not spill.is_released(lin, lin.weight)
    assert spill.to_file(t.to("meta"), tmp_path) is None  # nothing to write


def test_release_weight_moves_the_data_of_the_same_parameter(tmp_path, monkeypatch):
    lin = nn.Linear(256, 512)
    w, before, version = lin.weight, lin.weight.detach().clone(), lin.weight._version
    monkeypatch.setattr(spill, "MIN_BYTES", 1 << 30)
    assert not spill.release_weight(lin, tmp_path)  # small: stays
    monkeypatch.setattr(spill, "MIN_BYTES", 0)
    assert spill.release_weight(lin, tmp_path)
    assert lin.weight is w and w._version == version and torch.equal(w, before) and w.requires_grad
    assert spill.is_released(lin, w) and len(spill_maps(tmp_path)) == 1
    assert not spill.release_weight(lin, tmp_path)  # once
    x = torch.randn(3, 256)
    assert torch.equal(lin(x), x @ before.t() + lin.bias)


def _calibrated(config, monkeypatch, spilled: bool, tmp_path):
    monkeypatch.setattr(spill, "MIN_BYTES", 0 if spilled else 1 << 40)
    model = dmq.quantize(tiny_dit(), config)
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in model._dmq.modules}
    dmq.calibrate(model, backbone_loop(model, [900, 500, 100]), spill_dir=tmp_path)
    return model, floats


@pytest.mark.parametrize("config", ["w4a16", "w8a8"], ids=["gptq", "per-sample-gptq"])
def test_learned_rounding_spilled_gives_the_same_model_bit_for_bit(config, tmp_path, monkeypatch, one_thread):
    """Inputs beyond a tiny cache budget go to files, every rounded layer's float weight to a mapping: the learned
    weights, the report and the packed model are those of the all-in-memory run, and the float weights still read
    their original values until freeze releases them, leaving no mapping behind."""
    cfg = dmq.get_config(config)
    ref, _ = _calibrated(cfg, monkeypatch, False, tmp_path)
    assert spill_maps(tmp_path) == []
    trims = []
    monkeypatch.setattr(spill, "return_freed_memory", lambda: trims.append(1))
    model, floats = _calibrated(cfg.replace(cache_mb=1e-3), monkeypatch, True, tmp_path)
    learned = model._dmq.report["error_vs_rtn"]
    assert learned and learned == ref._dmq.report["error_vs_rtn"]
    released = [n for n in learned if spill.is_released(model.get_submodule(n), model.get_submodule(n).weight)]
    assert released == list(learned)  # every rounded layer, none of the others
    assert len(trims) == len(released)  # the heap gives each released weight back
    assert len(spill_maps(tmp_path)) >= len(released)
    for n in model._dmq.modules:
        a, b = model.get_submodule(n), ref.get_submodule(n)
        assert torch.equal(a.weight, floats[n])
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), n
    x = backbone_loop(model, [300])
    assert torch.equal(x(model)[0], x(ref)[0])
    for m in (model, ref):
        dmq.freeze(m)
    del floats, released
    gc.collect()
    assert spill_maps(tmp_path) == []
    assert torch.equal(x(model)[0], x(ref)[0])


def test_return_freed_memory_without_glibc(monkeypatch):
    spill.return_freed_memory()  # glibc here: malloc_trim runs
    monkeypatch.setattr(spill, "_malloc_trim", lambda: None)
    spill.return_freed_memory()  # another C library: nothing to call, no error


def test_calibrate_names_a_spill_dir_that_is_not_a_directory(tmp_path):
    model = dmq.quantize(tiny_dit(), "w4a16")
    with pytest.raises(ValueError, match="spill_dir must be an existing directory"):
        dmq.calibrate(model, backbone_loop(model, [900]), spill_dir=tmp_path / "missing")
