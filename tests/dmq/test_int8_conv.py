"""oneDNN's int8 convolution for frozen ``Conv2d`` layers with static INT activations (path ``onednn_int8``): exact
integer sums, the stated float bound against the exact result of the codes and against the fake-quant reference
(plain and shortcut-split convolutions of a U-Net), and the fallback to the reference, bit for bit, when the path
is off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmq
from dmq import kernels, kernels_cpu
from dmq.calibration import call_scope
from dmq.modules import QuantConv2d
from dmq.packed import int_codes
from tests.dmq.helpers import tiny_unet

U32 = 2.0**-24
ONEDNN_CONV = pytest.mark.skipif(not kernels_cpu.onednn_conv_ok(), reason="oneDNN int8 convolution unavailable")


@ONEDNN_CONV
@pytest.mark.parametrize("k,stride,pad,groups", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 1, 2)])
def test_int8_convolution_sums_are_exact_integers(k, stride, pad, groups):
    g = torch.Generator().manual_seed(k + stride + groups)
    a = torch.randint(0, 256, (2, 8, 7, 7), generator=g, dtype=torch.uint8)
    w = torch.randint(-128, 128, (6, 8 // groups, k, k), generator=g, dtype=torch.int8)
    conv = (stride, stride), (pad, pad), (1, 1), groups
    y = kernels_cpu.onednn_int8_conv(a, 1.0, 77, kernels_cpu.prepack_conv(w, conv), torch.ones(6), None, conv,
                                     torch.float32)
    exact = F.conv2d(a.double() - 77, w.double(), None, stride, pad, 1, groups)  # |sums| < 2^24: exact in float32
    assert y.shape == exact.shape and y.is_contiguous() and torch.equal(y.double(), exact)


def _frozen_unet(preset: str):
    model = tiny_unet().to(torch.bfloat16)
    q = dmq.quantize(model, preset)
    g = torch.Generator().manual_seed(1)

    def run(m):
        for t in (900.0, 500.0, 100.0):
            m(torch.randn(2, 1, 8, 8, generator=g).to(torch.bfloat16), torch.full((2,), t),
              class_labels=torch.tensor([1, 2]))

    dmq.calibrate(q, run)
    dmq.freeze(q)
    assert kernels.prepack_weights(q) > 0  # the oneDNN weight copies are opt-in
    return q


def _exact(layer: QuantConv2d, x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact value of the layer's quantized convolution from its codes, and ``conv(|x_q|, |w_q|) + |b|``."""
    xs = [x] if layer.split is None else [x[:, : layer.split], x[:, layer.split :]]
    qs = [layer.input_quantizer] if layer.split is None else [layer.input_quantizer, layer.input_quantizer_skip]
    bias = layer.bias.double()
    exact, mag = bias.view(1, -1, 1, 1), bias.abs().view(1, -1, 1, 1)
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    for i, (xi, qi) in enumerate(zip(xs, qs)):
        s, z = qi.scale[b].to(x.dtype), qi.zero_point[b].to(x.dtype)
        codes = kernels.act_codes(xi, s.reshape(1, 1, 1, 1), z.reshape(1, 1, 1, 1), qi.fmt.qmin, qi.fmt.qmax)
        xq = (codes.double() - z.double()) * s.double()
        part, lay = layer._part(i), layer.weight_layouts[i]
        w = int_codes(part, lay).double() * part["weight_scale"].double().reshape(-1, 1)
        w = w.reshape(layer.out_channels, -1, *layer.kernel_size)
        exact = exact + F.conv2d(xq, w, None, *args)
        mag = mag + F.conv2d(xq.abs(), w.abs(), None, *args)
    return exact, mag


@ONEDNN_CONV
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_unet_convolutions_on_int8_within_the_stated_bounds(preset):
    q = _frozen_unet(preset)
    convs = {n: m for n, m in q.named_modules() if isinstance(m, QuantConv2d) and m.packed}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0]))
             for n, m in convs.items()]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        out = q(x, t, class_labels=torch.tensor([3, 4])).sample
        with kernels.disable("onednn_int8"):
            ref_model = q(x, t, class_labels=torch.tensor([3, 4])).sample
    for h in hooks:
        h.remove()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, ref_model)  # the integer path ran
    fast_layers = split_layers = 0
    with torch.no_grad(), call_scope(calibrating=False, timestep=t):
        for n, layer in convs.items():
            xin = inputs[n]
            if not kernels.int_conv_ok(layer):
                continue
            b = layer.input_quantizer.single_bin(xin.shape[0])
            fast = layer(xin)
            with kernels.disable("onednn_int8"):
                ref = layer(xin)
            with kernels.disable("all"):
                assert torch.equal(layer(xin), ref)  # off: the fake-quant convolution, bit for bit
            exact, mag = _exact(layer, xin, b)
            k = layer.weight_layouts[0].cols + (layer.weight_layouts[1].cols if layer.split is not None else 0)
            # integer sums exact; float32 epilogue (4 roundings, one more for a split's sum), one bfloat16 rounding
            assert ((fast.double() - exact).abs() <= 5 * U32 * mag + 2.0**-8 * exact.abs()).all(), n
            # the reference: operands rounded to bfloat16, a K-term float32 sum, one bfloat16 rounding per conv
            bound = (k + 8) * U32 + 3 * 2.0**-9
            assert ((ref.double() - exact).abs() <= bound * mag + 2.0**-8 * exact.abs()).all(), n
            fast_layers += 1
            split_layers += layer.split is not None
    assert fast_layers >= 4 and split_layers >= 1


@ONEDNN_CONV
def test_int8_convolution_weights_are_opt_in_and_counted():
    model = tiny_unet().to(torch.bfloat16)
    q = dmq.quantize(model, "w8a8")
    dmq.calibrate(q, lambda m: m(torch.randn(2, 1, 8, 8).to(torch.bfloat16), torch.full((2,), 500.0),
                                 class_labels=torch.tensor([1, 2])))
    dmq.freeze(q)
    conv = next(m for m in q.modules() if isinstance(m, QuantConv2d) and m.packed and kernels.int_conv_ok(m))
    x = torch.randn(2, conv.in_channels, 8, 8).to(torch.bfloat16)
    with torch.no_grad(), call_scope(calibrating=False, timestep=torch.full((2,), 500.0)):
        default = conv(x)
        with kernels.disable("onednn_int8"):
            assert torch.equal(default, conv(x))  # no copy by default: the fake-quant convolution
        before = kernels.kernel_bytes(q)
        after = kernels.prepack_weights(q)
        assert after > before and not torch.equal(conv(x), default)  # the int8 convolution, its copy counted
        assert kernels.prepack_weights(q, False) < after


@ONEDNN_CONV
def test_dynamic_or_float_activations_keep_the_reference_convolution():
    q = dmq.quantize(tiny_unet().to(torch.bfloat16), "w4a8-fp")
    dmq.freeze(q)
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d) and m.packed]
    assert convs and not any(kernels.int_conv_ok(m) for m in convs)
