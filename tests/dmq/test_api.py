import copy

import pytest
import torch
from torch import nn

import dmq
from dmq.calibration import CONTEXT
from dmq.embedding import QuantEmbedding
from tests.dmq.helpers import backbone_loop, tiny_unet


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_observers_gone_after_freeze_and_only_the_timestep_hook_stays():
    model = tiny_unet()
    base_hooks = _hooks(model)
    loop = backbone_loop(model, [900, 100])
    q = dmq.quantize(model, dmq.get_config("w8a8").replace(
        act=dmq.QuantSpec("int8", symmetric=False, estimator="mse"), attn=None))
    assert _hooks(q) == base_hooks + 2  # the timestep pre/post hooks
    dmq.calibrate(q, loop)
    assert not CONTEXT.calibrating and not q._dmq.clock.calibrating and q._dmq.clock.policy is None
    dmq.freeze(q)
    assert all(t.observer is None for t in dmq.quantizers(q).values())
    assert _hooks(q) == base_hooks + 2  # the hook stays: each quantized model sets its own active call
    binned = dmq.freeze(dmq.calibrate(dmq.quantize(tiny_unet(), "w8a8"), loop))
    assert all(t.observer is None for t in dmq.quantizers(binned).values())
    assert _hooks(binned) == base_hooks + 2  # inference needs the timestep to pick a bin


def test_copy_leaves_original_untouched_and_restore_recovers_weights():
    model = tiny_unet()
    state = copy.deepcopy(model.state_dict())
    q = dmq.quantize(model, "w4a8", inplace=False)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    loop = backbone_loop(model, [500])
    dmq.freeze(dmq.calibrate(q, loop), pack=False)  # a packed freeze releases the float weights (test_packed.py)
    dmq.restore(q)
    assert not dmq.quantizers(q) and not hasattr(q, "_dmq")
    assert set(q.state_dict()) == set(state)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.allclose(loop(q)[0], loop(model)[0], atol=1e-6)


def test_include_exclude_globs():
    q = dmq.quantize(tiny_unet(), "w8a8", include=["down_blocks.*"], exclude=["*conv2"])
    names = q._dmq.modules
    assert names and all(n.startswith("down_blocks.") and not n.endswith("conv2") for n in names)


def test_nothing_to_quantize_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to quantize"):
        dmq.quantize(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "w8a8")
    with pytest.raises(ValueError, match="nothing to quantize"):
        dmq.quantize(tiny_unet(), "w8a8", include=["no_such_module"])


def test_freezing_uncalibrated_static_config_is_a_clear_error():
    q = dmq.quantize(tiny_unet(), "w8a8")
    with pytest.raises(dmq.NotCalibratedError, match="dmq.calibrate"):
        dmq.freeze(q)


def test_weight_only_and_dynamic_configs_need_no_calibration():
    for p in ("w4a16", "w4a8-fp", "nvfp4"):
        q = dmq.freeze(dmq.quantize(tiny_unet(), p))
        with torch.no_grad():
            assert torch.isfinite(backbone_loop(q, [10])(q)[0]).all()


def test_bad_use():
    with pytest.raises(ValueError, match="valid presets"):
        dmq.quantize(tiny_unet(), "int3")
    with pytest.raises(ValueError, match="not quantized"):
        dmq.freeze(tiny_unet())
    q = dmq.quantize(tiny_unet(), "w4a16")
    with pytest.raises(ValueError, match="already quantized"):
        dmq.quantize(q, "w8a8")


# ------------------------------------------------------------------------------------ freeze releases as it packs
class Boom(Exception):
    pass


def _rtn(preset):
    return dmq.get_config(preset).replace(rounding="rtn", per_sample_rounding="rtn")


def _state(model):
    """Every parameter and buffer, packed ones as their tensors, by value."""
    from dmq.packed_weight import PackedWeight

    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        parts = v.tensors() if isinstance(v, PackedWeight) else {"": v}
        out.update({f"{k}:{n}": t.detach().clone() for n, t in parts.items()})
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [_rtn("nvfp4"), _rtn("w4a16"), "w4a16", "w8a8"],
                         ids=["nvfp4-rtn", "w4a16-rtn", "w4a16-gptq", "w8a8-per-sample-gptq"])
def test_weight_fq_built_on_demand_gives_the_packed_model_of_the_eager_flow(config, one_thread):
    """quantize leaves weight_fq unbuilt; building it right after quantize (the earlier flow) or only when freeze
    packs gives the same packed model bit for bit, with round-to-nearest and with GPTQ."""
    from tests.dmq.helpers import tiny_dit

    models = [dmq.quantize(tiny_dit(), config) for _ in range(2)]
    lazy, eager = models
    assert all(lazy.get_submodule(n)._buffers["weight_fq"] is None for n in lazy._dmq.modules)
    for n in eager._dmq.modules:
        eager.get_submodule(n).weight_fq  # noqa: B018 -- built now, as dmq.quantize did
    for m in models:
        dmq.freeze(dmq.calibrate(m, backbone_loop(m, [900, 100])))
    assert _same(_state(lazy), _state(eager))


def test_a_state_dict_holds_weight_fq_even_before_it_is_built(one_thread):
    from tests.dmq.helpers import tiny_dit

    a, b = dmq.quantize(tiny_dit(), "w4a16"), dmq.quantize(tiny_dit(1), "w4a16")  # GPTQ: weight_fq is state
    sd = a.state_dict()
    tables = {n for n in a._dmq.modules if isinstance(a.get_submodule(n), QuantEmbedding)}
    assert tables  # the class embedder's table: round-to-nearest, rebuilt from the float table, so no state
    assert all((f"{n}.weight_fq" in sd) == (n not in tables) for n in a._dmq.modules)
    b.load_state_dict(sd)  # strict: a fresh model takes it
    assert all(torch.equal(b.get_submodule(n).dequantized_weight(), a.get_submodule(n).dequantized_weight())
               for n in a._dmq.modules)


def _original_weights(model):
    return {n: model.get_submodule(n).weight for n in model._dmq.modules}


def test_freeze_releases_each_float_weight_once_its_layer_is_packed(tmp_path, monkeypatch, one_thread):
    import dmq.transaction as tx
    from dmq.modules import PackedMixin
    from tests.dmq.test_journal import journal_files

    monkeypatch.setattr(tx, "SMALL", 0)  # the tiny layers count as large: the snapshot keeps no copy of them
    model = dmq.quantize(tiny_unet(), _rtn("w4a16"))
    dmq.calibrate(model, backbone_loop(model, [900, 100]))
    ref = copy.deepcopy(model)
    weights = _original_weights(model)
    alive, files, real = [], [], PackedMixin.pack

    def pack(self, prepare=True):
        alive.append(sum(w.untyped_storage().nbytes() > 0 for w in weights.values()))
        files.append(len(journal_files(tmp_path)))
        real(self, prepare)

    monkeypatch.setattr(PackedMixin, "pack", pack)
    dmq.freeze(model, journal_dir=tmp_path)
    n = len(weights)
    assert alive == list(range(n, 0, -1))  # layer k is packed with only k - 1 float weights gone: one at a time
    assert files == [0] + [1] * (n - 1) and journal_files(tmp_path) == []  # the journal: while needed, then gone
    assert all(w.numel() == 0 for w in weights.values())
    monkeypatch.setattr(PackedMixin, "pack", real)
    assert _same(_state(model), _state(dmq.freeze(ref)))  # the same packed model as without the journal


@pytest.mark.parametrize("where", ["pack 1", "pack 3", "pack last", "journal write", "after packing"])
def test_a_freeze_failing_after_releasing_weights_rolls_back_bit_for_bit(where, tmp_path, monkeypatch, one_thread):
    import dmq.backend
    import dmq.journal
    import dmq.transaction as tx
    from dmq.modules import PackedMixin
    from tests.dmq.test_journal import journal_files

    monkeypatch.setattr(tx, "SMALL", 0)
    model = dmq.quantize(tiny_unet(), _rtn("w4a16"))
    dmq.calibrate(model, backbone_loop(model, [900, 100]))
    ref = copy.deepcopy(model)
    before, weights = _state(model), _original_weights(model)
    layers = {n: model.get_submodule(n) for n in model._dmq.modules}
    n, calls, error = len(weights), [], Boom()
    fail_at = {"pack 1": 1, "pack 3": 3, "pack last": n}.get(where)
    real_pack, real_release = PackedMixin.pack, dmq.journal.Journal.release

    def pack(self, prepare=True):
        calls.append(1)
        if len(calls) == fail_at:
            raise error
        real_pack(self, prepare)

    def release(self, t):
        if self.nbytes:  # the second weight to the journal: interrupted while writing
            raise KeyboardInterrupt
        return real_release(self, t)

    def attach(model):
        raise error

    monkeypatch.setattr(PackedMixin, "pack", pack)
    if where == "journal write":
        monkeypatch.setattr(dmq.journal.Journal, "release", release)
        error = KeyboardInterrupt
    if where == "after packing":
        monkeypatch.setattr(dmq.backend, "attach", attach)
    with pytest.raises(BaseException) as err:
        dmq.freeze(model, journal_dir=tmp_path)
    assert err.value is error or err.type is error
    assert not getattr(err.value, "__notes__", None)
    if fail_at:
        assert len(calls) == fail_at  # failed after fail_at - 1 weights went to the journal
    assert {k: model.get_submodule(k) for k in layers} == layers  # the same modules, parameters, values
    assert all(model.get_submodule(k).weight is w for k, w in weights.items())
    assert _same(_state(model), before) and not model._dmq.frozen and not model._dmq.packed
    assert journal_files(tmp_path) == []
    monkeypatch.undo()
    assert _same(_state(dmq.freeze(model)), _state(dmq.freeze(ref)))  # and it freezes normally afterwards


def test_a_weight_shared_with_a_float_layer_stays(monkeypatch, one_thread):
    import dmq.transaction as tx

    monkeypatch.setattr(tx, "SMALL", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[1].weight = model[0].weight  # tied; the second layer stays in full precision
    w = model[0].weight.detach().clone()
    dmq.freeze(dmq.quantize(model, _rtn("w4a16"), exclude=["1"]))
    assert model[0].packed and torch.equal(model[1].weight, w)


def test_freeze_journal_dir_must_be_a_writable_directory(tmp_path, one_thread):
    model = dmq.quantize(tiny_unet(), _rtn("w4a16"))
    with pytest.raises(TypeError, match="journal_dir must be a path"):
        dmq.freeze(model, journal_dir=3)
    missing = tmp_path / "nope"  # the message may shorten a long path: check the start of it
    with pytest.raises(ValueError, match=f"journal_dir must be an existing directory, got .*{str(missing)[:20]}"):
        dmq.freeze(model, journal_dir=missing)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="journal_dir must be an existing directory"):
        dmq.freeze(model, journal_dir=str(tmp_path / "f"))
    assert not model._dmq.frozen
