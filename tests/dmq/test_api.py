import copy

import pytest
import torch
from torch import nn

import dmq
from dmq.calibration import CONTEXT
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
