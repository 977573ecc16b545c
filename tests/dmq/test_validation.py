"""Validation at the door: a hypothesis property test over the public argument space of dmq. Whatever is passed,
each call returns a result or raises a clear error (``TypeError`` / ``ValueError``, or ``NotCalibratedError`` for a
freeze without data), and a call that raises leaves the model as it was."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dmq
from dmq import validation as check
from tests.dmq.helpers import TimeToy

CLEAR = (TypeError, ValueError)
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 4), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["w8a8", "w4a16", "int8", "all", "uniform", "lin*", "*", "", "w3a3", b"w8a8"]),
    st.lists(st.sampled_from(["lin", "lin*", 3, None]), max_size=3), st.just({"a": 1}), st.just(torch.zeros(2)),
    st.just(object()),
)


def _loop(m):
    for t in (100.0, 600.0):
        m(torch.randn(2, 32, generator=torch.Generator().manual_seed(int(t))), torch.full((2,), t))


def _fingerprint(model):
    return ([(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            getattr(model, "_dmq", None) is not None)


def _same(a, b):
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k])
                                                                                 for k in a[1])


def _call(fn, *args, errors=CLEAR, model=None, **kwargs):
    """``fn(...)``; on an exception it must be one of ``errors`` with a non-empty message, the model unchanged."""
    before = _fingerprint(model) if model is not None else None
    try:
        return fn(*args, **kwargs)
    except errors as e:
        assert str(e), f"{type(e).__name__} without a message"
        if before is not None:
            assert _same(before, _fingerprint(model)), f"{fn.__name__} raised {e!r} and changed the model"
        return e


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(config=ANY, include=ANY, exclude=ANY, inplace=ANY)
def test_quantize_accepts_or_rejects_clearly(config, include, exclude, inplace):
    model = TimeToy()
    out = _call(dmq.quantize, model, config, include=include, exclude=exclude, inplace=inplace, model=model)
    if isinstance(out, nn.Module):
        assert dmq.summary(out)["layers"] == 1


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(loop=st.one_of(ANY, st.just(_loop)), steps=ANY, pack=ANY, allow=ANY)
def test_calibrate_freeze_restore_accept_or_reject_clearly(loop, steps, pack, allow):
    model = dmq.quantize(TimeToy(), "w8a8")
    calibrated = _call(dmq.calibrate, model, loop, steps=steps, model=model)
    frozen = _call(dmq.freeze, model, pack=pack, model=model, errors=(*CLEAR, dmq.NotCalibratedError))
    if isinstance(calibrated, nn.Module) and isinstance(frozen, nn.Module):
        assert dmq.summary(model)["frozen"] and dmq.summary(model)["nonfinite"] == {}
    _call(dmq.restore, model, allow_dequantized=allow, model=model)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=40)
@given(first=st.one_of(ANY, st.just("file"), st.just("dir")), second=st.one_of(ANY, st.just("file")))
def test_save_and_load_accept_or_reject_clearly(tmp_path_factory, first, second):
    folder = tmp_path_factory.mktemp("io")
    model = dmq.freeze(dmq.quantize(TimeToy(), "w4a16"))
    paths = {"file": folder / "m.safetensors", "dir": folder}
    dmq.save(model, paths["file"])

    def where(v):  # strings name files inside the temporary folder: the test never writes anywhere else
        return paths.get(v, folder / v.replace("/", "_")) if isinstance(v, str) and v else v

    a, b = where(first), where(second)
    _call(dmq.save, model, b)
    fresh = TimeToy()
    _call(dmq.load, fresh, b, model=fresh)
    _call(dmq.load, a)
    _call(dmq.load, a, b)


@given(value=ANY)
def test_every_public_getter_accepts_or_rejects_clearly(value):
    for fn in (dmq.get_config, dmq.summary, dmq.quantizers, dmq.calibration.get_policy, dmq.quantization_map,
               dmq.learned_config):
        _call(fn, value)
    _call(dmq.UniformSteps, value)
    _call(dmq.NormalSteps, sigma=value)
    _call(dmq.QuantSpec, value)
    _call(dmq.QuantSpec, "int8", granularity=value)
    _call(dmq.QuantSpec, "int8", timestep_bins=value)
    for field in ("weight", "keep_fp", "timestep_range", "steps", "lowrank", "smooth", "shortcut_split"):
        _call(dmq.QuantConfig, **{"weight": dmq.QuantSpec("int8"), field: value})


@pytest.mark.parametrize("fn, value, error, message", [
    (check.integer, True, TypeError, r"x must be an integer, got True \(bool\)"),
    (check.integer, 2.0, TypeError, r"x must be an integer, got 2.0 \(float\)"),
    (check.real, math.nan, ValueError, "x must be a finite number, got nan"),
    (check.real, "1", TypeError, r"x must be a real number, got '1' \(str\)"),
    (check.boolean, 1, TypeError, r"x must be True or False, got 1 \(int\)"),
    (check.globs, b"a*", TypeError, "x must be a glob string or a list of glob strings"),
    (check.path, 3, TypeError, r"x must be a path \(str or os.PathLike\), got 3 \(int\)"),
    (check.path, "", ValueError, "x must be a non-empty path"),
])
def test_checks_name_the_argument_the_value_and_what_is_allowed(fn, value, error, message):
    with pytest.raises(error, match=message):
        fn("x", value)
    assert check.integer("x", 3, minimum=1, maximum=3) == 3 and check.globs("x", "a*") == ("a*",)
    with pytest.raises(ValueError, match="x must be an integer >= 1 and <= 3, got 4"):
        check.integer("x", 4, minimum=1, maximum=3)
