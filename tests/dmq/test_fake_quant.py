import pytest
import torch

from dmq import formats
from dmq.fake_quant import fake_quant, params_from_range, quantize_rows_dynamic, quantize_weight
from tests.dmq.helpers import sqnr


def test_symmetric_int_closed_form():
    fmt = formats.get("int8")
    x = torch.linspace(-3, 2, 101)
    scale, zp = params_from_range(x.min(), x.max(), fmt, True)
    assert zp is None and scale == pytest.approx(3 / 127)
    q = fake_quant(x, fmt, scale)
    assert torch.allclose(q, torch.round(x / scale).clamp(-128, 127) * scale)


def test_asymmetric_uint_zero_point_is_exact_for_zero_and_range_ends():
    fmt = formats.IntFormat(4, signed=False)
    scale, zp = params_from_range(torch.tensor(-1.0), torch.tensor(2.0), fmt, False)
    assert scale == pytest.approx(3 / 15) and zp == 5
    q = fake_quant(torch.tensor([0.0, -1.0, 2.0, 9.0]), fmt, scale, zp)
    assert q[0] == 0 and q[1] == pytest.approx(-1.0) and q[2] == pytest.approx(2.0) and q[3] == pytest.approx(2.0)


def test_group_weights_beat_channel_weights_on_outlier_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    w[:, :32] *= 20  # one loud group per row
    fmt = formats.get("int4")
    per_channel = quantize_weight(w, fmt, "channel", 32, True, "minmax")
    per_group = quantize_weight(w, fmt, "group", 32, True, "minmax")
    quiet = slice(32, None)
    assert sqnr(w[:, quiet], per_group[:, quiet]) > sqnr(w[:, quiet], per_channel[:, quiet]) + 10


@pytest.mark.parametrize("estimator", ["mse", "fp_bias"])
def test_search_never_worse_than_minmax(estimator):
    torch.manual_seed(1)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    fmt = formats.get("e2m1")
    base = quantize_weight(w, fmt, "channel", 128, True, "minmax")
    searched = quantize_weight(w, fmt, "channel", 128, True, estimator)
    err = lambda q: (q - w).pow(2).sum(-1)  # noqa: E731
    assert (err(searched) <= err(base) + 1e-6).all()


def test_group_size_not_dividing_the_row_pads():
    w = torch.randn(4, 50)
    q = quantize_weight(w, formats.get("int8"), "group", 32, True, "minmax")
    assert q.shape == w.shape and sqnr(w, q) > 35


def test_dynamic_per_token_scales_each_row():
    x = torch.randn(4, 64) * torch.tensor([[1e-3], [1.0], [1e3], [10.0]])
    q = quantize_rows_dynamic(x, formats.get("int8"), "token", 0, True)
    for i in range(4):
        assert sqnr(x[i], q[i]) > 35
