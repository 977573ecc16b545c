"""dmq.transaction: a rollback restores modules, tensors, hooks and dmq state objects, and the original exception
propagates; what cannot be restored is named."""

import pytest
import torch
from torch import nn

import dmq
from dmq.transaction import SMALL, Snapshot, transaction
from tests.dmq.helpers import TimeToy


class Boom(Exception):
    pass


def test_rollback_restores_modules_tensors_hooks_and_attributes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    kept = model.register_forward_hook(lambda m, a, o: None)
    lin, bias = model[0], model[0].bias.detach().clone()
    error = Boom()
    with pytest.raises(Boom) as err, transaction(model):
        model[0] = nn.Linear(4, 4)  # a swapped module
        model.register_forward_pre_hook(lambda m, a: None)  # an added hook
        kept.remove()  # a removed hook
        model[1].extra = 5  # a new attribute
        lin.bias.data.add_(1.0)  # an in-place change of a small tensor
        model.register_buffer("scale", torch.ones(2))
        raise error
    assert err.value is error
    assert model[0] is lin and torch.equal(lin.bias, bias)
    assert len(model._forward_hooks) == 1 and not model._forward_pre_hooks and "scale" not in model._buffers
    assert not hasattr(model[1], "extra")
    kept.remove()  # the handle still works: the hook dict was restored in place
    assert not model._forward_hooks


def test_quantize_state_and_observers_roll_back():
    model = dmq.quantize(TimeToy(), "w8a8")
    snap = Snapshot(model)
    obs = model.lin.input_quantizer.observer
    dmq.calibrate(model, lambda m: m(torch.randn(2, 32), torch.full((2,), 300.0)))
    assert int(obs.count.sum()) == 64 and dmq.summary(model)["calibration_points"] == 1
    assert snap.rollback() == []
    assert int(obs.count.sum()) == 0 and dmq.summary(model)["calibration_points"] == 0


def test_a_large_tensor_changed_in_place_is_named():
    model = nn.Linear(SMALL, 2)  # a weight above the copy threshold
    with pytest.raises(Boom) as err, transaction(model), torch.no_grad():
        model.weight.mul_(2)
        raise Boom
    assert "could not roll back 1 tensor(s) changed in place: ['0:.weight']" in err.value.__notes__[0]
    w = model.weight.detach().clone()
    with pytest.raises(Boom), transaction(model, clone_all=True), torch.no_grad():
        model.weight.mul_(2)
        raise Boom
    assert torch.equal(model.weight, w)


def test_nested_transactions_defer_to_a_covering_one():
    model = nn.Linear(2, 2)
    with transaction(model, covers_nested=True) as outer:
        with transaction(model) as inner:
            assert inner is None
        with transaction(model, clone_all=True) as stronger:
            assert isinstance(stronger, Snapshot)  # the outer one copied no large weights
        with transaction(nn.Linear(2, 2)) as other:
            assert isinstance(other, Snapshot)
    assert isinstance(outer, Snapshot)
    with transaction(model) as alone:
        assert isinstance(alone, Snapshot)


def test_spilled_tensors_come_back_on_rollback_and_the_journal_goes_with_the_snapshot(tmp_path):
    from dmq.transaction import covering
    from tests.dmq.test_journal import journal_files

    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(4, 4))  # 90,000 weights (above SMALL), 16
    big, small = model[0].weight, model[1].weight
    before = big.detach().clone()
    with pytest.raises(Boom) as err, transaction(model) as snap:
        assert not snap.spill(small, tmp_path)  # copied by the snapshot anyway: releasing it would free nothing
        assert not snap.spill(torch.zeros(300, 300), tmp_path)  # not the snapshot's
        model[0].weight = nn.Parameter(torch.zeros(1))  # the layer moves on to a new weight
        assert snap.spill(big, tmp_path) and big.untyped_storage().nbytes() == 0
        assert not snap.spill(big, tmp_path)  # once
        assert len(journal_files(tmp_path)) == 1
        raise Boom
    assert not getattr(err.value, "__notes__", None)
    assert model[0].weight is big and torch.equal(big, before)
    assert journal_files(tmp_path) == []
    with transaction(model) as snap:  # committed: the journal goes, the released tensor stays released
        assert snap.spill(big, tmp_path)
    assert big.numel() == 0 and journal_files(tmp_path) == []
    with transaction(model, covers_nested=True) as outer:  # a nested step spills into the snapshot that covers it
        with transaction(model) as inner:
            assert inner is None and covering(model) is outer and covering(nn.Linear(2, 2)) is None
    assert covering(model) is None
    assert SMALL < 300 * 300
