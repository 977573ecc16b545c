import torch

import dmq
from dmq.calibration import call_scope
from dmq.rounding.block import find_blocks, reconstruct_block
from tests.dmq.helpers import tiny_dit, tiny_unet


def _block_err(block, calls, targets):
    with torch.no_grad():
        return sum(float((block(*a, **k) - t).pow(2).mean()) for (a, k), t in zip(calls, targets))


def test_brecq_block_output_error_not_above_rtn(one_thread):
    q = dmq.quantize(tiny_dit(), "w4a16")
    names = q._dmq.modules
    blocks = find_blocks(q, names)
    assert [b for b, _ in blocks] == ["transformer_blocks.0"]
    assert set(blocks[0][1]) == {n for n in names if n.startswith("transformer_blocks.0.")}
    block = q.get_submodule("transformer_blocks.0")
    g = torch.Generator().manual_seed(0)
    calls = [((torch.randn(2, 16, 16, generator=g),), {"timestep": torch.full((2,), t), "class_labels":
                                                         torch.tensor([1, 5])}) for t in (900.0, 400.0, 50.0)]
    with call_scope(calibrating=True, observe=False):
        targets = [block(*a, **k).detach() for a, k in calls]
    rtn_err = _block_err(block, calls, targets)
    grads_before = [p.grad for p in block.parameters()]
    err, rtn = reconstruct_block(block, [q.get_submodule(n) for n in blocks[0][1]], calls, iters=60)
    assert rtn == rtn_err > 0
    new_err = _block_err(block, calls, targets)
    assert new_err == err < rtn_err
    assert all(p.requires_grad for p in block.parameters())
    assert [p.grad for p in block.parameters()] == grads_before  # no gradient leaked into the model


def test_unet_blocks_are_resnets_and_attentions():
    q = dmq.quantize(tiny_unet(), "w4a8")
    kinds = {type(q.get_submodule(b)).__name__ for b, _ in find_blocks(q, q._dmq.modules)}
    assert kinds == {"ResnetBlock2D", "Attention"}
