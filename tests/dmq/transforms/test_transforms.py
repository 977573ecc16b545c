import copy

import pytest
import torch
from torch import nn

import dmq
from dmq.rounding.layer import set_weight_fq, target_weight
from dmq.transforms import find_groups, fold, low_rank, rotation_matrix
from tests.dmq.helpers import backbone_loop, tiny_dit, tiny_unet


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _outputs(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    return torch.cat([model(x.to(next(model.parameters()).dtype), torch.full((3,), float(t)), class_labels=y).sample
                      for t in (900.0, 500.0, 50.0)])


@pytest.mark.parametrize("make, kinds", [(tiny_dit, {"adaln", "value"}), (tiny_unet, {"norm", "value"})],
                         ids=["dit", "unet"])
def test_smoothing_folds_are_exact_in_full_precision(make, kinds):
    model = make().double()
    with torch.no_grad():  # non-trivial modulation / norm parameters, so that the folds are really exercised
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.3)
    ref = _outputs(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups = find_groups(model, linears)
    assert {g.kind for g in groups} == kinds
    g = torch.Generator().manual_seed(0)
    for grp in groups:
        k = model.get_submodule(grp.consumers[0]).in_features
        fold(model, grp, torch.rand(k, generator=g, dtype=torch.float64) * 4 + 0.25, {})
    assert _rel(_outputs(model), ref) < 1e-10  # float64: exact up to rounding
    # float32 model: within 1e-5 relative
    m32 = make()
    ref32 = _outputs(m32)
    for grp in find_groups(m32, linears):
        k = m32.get_submodule(grp.consumers[0]).in_features
        fold(m32, grp, torch.rand(k, generator=g) * 4 + 0.25, {})
    assert _rel(_outputs(m32), ref32) < 1e-5


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("n", [16, 96, 384])
def test_rotations_are_orthogonal(kind, n):
    r = rotation_matrix(kind, n, seed=1)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=r.dtype), atol=1e-12)


def _unquantized(model):
    """Quantized path with every weight at its (transformed) float target and activation quantizers off."""
    for n in model._dmq.modules:
        m = model.get_submodule(n)
        set_weight_fq(m, target_weight(m))
    for q in dmq.quantizers(model).values():
        q.enabled = False
    return model


@pytest.mark.parametrize("variant", ["hadamard", "rotate", "smooth", "smooth+hadamard+svd4"])
def test_transformed_model_is_exactly_equivalent_before_quantization(variant, one_thread):
    fp = tiny_dit()
    ref = _outputs(fp)
    q = dmq.quantize(fp, f"w4a8+{variant}", inplace=False)
    dmq.calibrate(q, backbone_loop(fp, [900, 400, 50]))
    assert _rel(_outputs(_unquantized(q)), ref) < 1e-5
    st = q._dmq
    if "smooth" in variant:
        assert st.report["smooth_groups"] >= 1 and st.originals
    if "hadamard" in variant or "rotate" in variant:
        assert st.report["rotated_layers"] == len([n for n in st.modules
                                                   if isinstance(q.get_submodule(n), nn.Linear)])


def test_restore_undoes_folded_smoothing_exactly(one_thread):
    model = tiny_dit()
    before = copy.deepcopy(model.state_dict())
    dmq.calibrate(dmq.quantize(model, "w4a8+smooth0.5"), backbone_loop(model, [700, 100]))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # folded in place
    dmq.restore(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_full_rank_lowrank_branch_reproduces_the_layer(make, one_thread):
    fp = make()
    ref = _outputs(fp)
    # rank = min(out, in·kh·kw) for every layer; lookup tables have no low-rank branch: kept in full precision
    cfg = dmq.get_config("w4a16+svd100000").replace(keep_fp=(), embedding=None)
    q = dmq.quantize(fp, cfg, inplace=False)
    dmq.calibrate(q, backbone_loop(fp, [500]))
    # weight-only INT4 on an (almost) zero residual: the 16-bit branch carries the whole layer
    assert _rel(_outputs(q), ref) < 1e-4
    for n in q._dmq.modules:
        m = q.get_submodule(n)
        if m.lowrank_down is not None:
            assert m.lowrank_down.shape[0] == min(m.weight.shape[0], m.weight[0].numel())


def test_lowrank_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    for rank, exact in ((5, True), (5, False), (30, None)):
        up, down = low_rank(w, rank, exact)
        s = torch.linalg.svdvals(w)
        # Eckart-Young: the residual's Frobenius norm is the tail of the singular values
        resid = float((w - up.double() @ down.double()).norm())
        assert resid == pytest.approx(float(s[rank:].norm()), rel=1e-3, abs=1e-4)
