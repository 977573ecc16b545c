"""Regression tests of issue 15 for the dmq core: atomic freeze, non-finite accounting, string globs, the sealed
quantization map, and clear errors for bad paths."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dmq
from dmq import integrity
from tests.dmq.helpers import tiny_dit, tiny_unet

BINS = 4
CFG = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), act=dmq.QuantSpec("int8", timestep_bins=BINS),
                      keep_fp=(), name="w8a8-bins")


class TwoBranch(nn.Module):
    """``a(x * (1 + t/100)) + b(y)``: branch ``a`` sees timestep-dependent activations, ``b`` sees ``y`` only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, timestep, y):
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1)
        return self.a(x * (1 + t / 100)) + self.b(y)


def _loop(seed: int, nan_y: bool):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 8, generator=g) for _ in range(BINS)]
    y = torch.full((3, 8), float("nan")) if nan_y else torch.randn(3, 8, generator=g)

    def loop(m):
        for k, x in enumerate(xs):  # one call per timestep bin
            m(x, torch.full((3,), 250.0 * k + 100), y)
    return loop


def _scales(model):
    return {n: (q.scale.clone(), q.zero_point.clone()) for n, q in dmq.quantizers(model).items()}


def test_failed_freeze_changes_nothing_and_a_later_calibration_is_clean(caplog):
    """Defect 1 and 6: a quantizer that saw only NaN fails freeze by name, nothing is frozen, and calibrating again
    then freezing gives exactly what a run without the failed freeze gives."""
    a = dmq.quantize(TwoBranch(), CFG)
    with caplog.at_level(logging.WARNING, logger="dmq"):
        dmq.calibrate(a, _loop(1, nan_y=True))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning, naming the worst layer, not one per quantizer
    assert "b.input_quantizer (96 non-finite, 0 finite)" in warnings[0].getMessage()
    report = dmq.summary(a)["nonfinite"]
    assert report == {"b.input_quantizer": {"nonfinite": BINS * 3 * 8, "finite": 0, "bins": [3 * 8] * BINS}}
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(dmq.NotCalibratedError, match=r"b\.input_quantizer: saw only non-finite activation values "
                                                     r"during calibration \(96 NaN/inf"):
        dmq.freeze(a)
    assert not any(q.frozen for q in dmq.quantizers(a).values())  # 'a' had data but was not frozen either
    assert all(q.observer is not None for q in dmq.quantizers(a).values())
    assert not dmq.summary(a)["frozen"]
    after = a.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    caplog.clear()
    dmq.calibrate(a, _loop(2, nan_y=False))
    dmq.freeze(a)
    b = dmq.quantize(TwoBranch(), CFG)  # the same calibrations, no failed freeze in between
    dmq.calibrate(b, _loop(1, nan_y=True))
    dmq.calibrate(b, _loop(2, nan_y=False))
    dmq.freeze(b)
    sa, sb = _scales(a), _scales(b)
    assert all(torch.equal(sa[n][0], sb[n][0]) and torch.equal(sa[n][1], sb[n][1]) for n in sb)
    assert len(set(sa["a.input_quantizer"][0].tolist())) == BINS  # per-bin scales, not one value in every bin
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(a(x, torch.full((3,), 600.0), y), b(x, torch.full((3,), 600.0), y))
    # the counts survive freezing; the quantizer that never saw a value at all is named as such
    assert dmq.summary(a)["nonfinite"]["b.input_quantizer"]["finite"] == BINS * 3 * 8
    c = dmq.quantize(TwoBranch(), CFG)
    with pytest.raises(dmq.NotCalibratedError, match=r"2 static activation.*a\.input_quantizer: no calibration data"):
        dmq.freeze(c)


def test_a_failing_calibration_loop_leaves_the_statistics_as_they_were():
    model = dmq.quantize(TwoBranch(), CFG)
    dmq.calibrate(model, _loop(1, nan_y=False))
    obs = model.a.input_quantizer.observer
    saved = (obs.min.clone(), obs.max.clone(), obs.count.clone(), obs.nonfinite_bins.clone())

    def broken(m):
        _loop(2, nan_y=False)(m)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dmq.calibrate(model, broken)
    obs = model.a.input_quantizer.observer
    assert all(torch.equal(u, v) for u, v in zip(saved, (obs.min, obs.max, obs.count, obs.nonfinite_bins)))
    assert dmq.summary(model)["calibration_points"] == BINS


def test_a_string_is_one_glob():
    """Defect 3: include/exclude given as a string are one glob, not its characters."""
    full = dmq.summary(dmq.quantize(tiny_unet(), "w8a8"))["layers"]
    one = dmq.quantize(tiny_unet(), "w8a8", include="mid_block*")
    assert one._dmq.modules and all(n.startswith("mid_block") for n in one._dmq.modules)
    assert one._dmq.modules == dmq.quantize(tiny_unet(), "w8a8", include=["mid_block*"])._dmq.modules
    assert len(one._dmq.modules) < full
    cfg = dmq.get_config("w8a8").replace(keep_fp=())
    everything = dmq.quantize(tiny_unet(), cfg)._dmq.modules
    assert "conv_in" in everything
    assert dmq.quantize(tiny_unet(), cfg, exclude="conv_in")._dmq.modules == [n for n in everything
                                                                                if n != "conv_in"]
    with pytest.raises(TypeError, match=r"include must be a glob string or a list of glob strings, got 5 \(int\)"):
        dmq.quantize(tiny_unet(), "w8a8", include=5)
    with pytest.raises(TypeError, match="exclude must hold glob strings only"):
        dmq.quantize(tiny_unet(), "w8a8", exclude=["conv_in", None])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = dmq.quantize(tiny_dit(), "w4a16")
    dmq.freeze(model)
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    dmq.save(model, path)
    return path


def test_the_quantization_map_is_covered_by_the_digest(checkpoint, tmp_path):
    """Defect 4: an edited value in the header's map (timestep_range 1000 -> 9000) fails to load."""
    with safe_open(str(checkpoint), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert '"timestep_range": [0.0, 1000.0]' in meta["dmq"]
    edited = {**meta, "dmq": meta["dmq"].replace('"timestep_range": [0.0, 1000.0]', '"timestep_range": [0.0, 9000.0]')}
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, str(bad), metadata=edited)
    with pytest.raises(ValueError, match="does not match its digest: the header was edited or damaged"):
        dmq.load(bad)
    model = tiny_dit()
    with pytest.raises(ValueError, match="does not match its digest"):
        dmq.load(model, bad)
    assert not hasattr(model, "_dmq")
    unsealed = tmp_path / "unsealed.safetensors"
    save_file(tensors, str(unsealed), metadata={"dmq": meta["dmq"]})
    with pytest.raises(ValueError, match="no 'dmq_integrity' entry"):
        dmq.load(unsealed)
    assert integrity.SEAL_KEY in meta and dmq.load(checkpoint) is not None


def test_bad_paths_are_clear_errors(checkpoint, tmp_path):
    """Defect 7: save into a missing folder, load a folder without a checkpoint, load without a path."""
    model = dmq.load(checkpoint)
    with pytest.raises(ValueError, match="the folder '.*missing' does not exist"):
        dmq.save(model, tmp_path / "missing" / "m.safetensors")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="no dmq_integrity.json: not a folder written by dmq"):
        dmq.load(tmp_path)
    with pytest.raises(TypeError, match=r"dmq.load\(model, path\): path is missing"):
        dmq.load(tiny_dit())
    with pytest.raises(TypeError, match="model_or_path must be a path"):
        dmq.load(3)
    with pytest.raises(TypeError, match="path must be a path"):
        dmq.save(model, None)
    assert list(tmp_path.iterdir()) == []  # no temporary files left behind


def test_save_replaces_atomically_and_leaves_no_temporary_file(checkpoint, tmp_path):
    model = dmq.load(checkpoint)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    dmq.save(model, path)
    with safe_open(str(path), "pt") as f, safe_open(str(checkpoint), "pt") as g:
        assert set(f.keys()) == set(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    meta = json.loads(safe_open(str(path), "pt").metadata()["dmq_integrity"])
    assert set(meta) == {"version", "tensors", "digest"}
