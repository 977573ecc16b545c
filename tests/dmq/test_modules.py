import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmq
from dmq.fake_quant import fake_quant, quantize_weight
from dmq.modules import QuantAttnProcessor, QuantConv2d, QuantLinear
from tests.dmq.helpers import backbone_loop, sqnr, tiny_dit, tiny_unet

W8A8 = dmq.get_config("w8a8")


def test_shortcut_split_equals_hand_computation():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 3, padding=1)
    cfg = W8A8.replace(act=dmq.QuantSpec("int8", symmetric=False))
    q = QuantConv2d.from_float(conv, cfg, split=4)
    a = torch.randn(2, 4, 5, 5) * 10  # loud half (the up path)
    b = torch.randn(2, 8, 5, 5) * 0.1  # quiet half (the skip)
    x = torch.cat([a, b], 1)
    dmq.calibrate(dmq.quantize(nn.Identity(), "w4a16") if False else _wrap(q), lambda m: m(x))
    q.input_quantizer.freeze()
    q.input_quantizer_skip.freeze()
    with torch.no_grad():
        out = q(x)
    w1 = quantize_weight(conv.weight[:, :4], cfg.weight.fmt, "channel", 128, True, "mse")
    w2 = quantize_weight(conv.weight[:, 4:], cfg.weight.fmt, "channel", 128, True, "mse")
    qa, qb = q.input_quantizer, q.input_quantizer_skip
    xa = fake_quant(a, qa.fmt, qa.scale[0], qa.zero_point[0])
    xb = fake_quant(b, qb.fmt, qb.scale[0], qb.zero_point[0])
    hand = F.conv2d(xa, w1, None, 1, 1) + F.conv2d(xb, w2, conv.bias, 1, 1)
    assert torch.allclose(out, hand, atol=1e-5)
    # the split keeps the quiet half: a single quantizer over both halves would round it away
    single = QuantConv2d.from_float(conv, cfg)
    dmq.calibrate(_wrap(single), lambda m: m(x))
    single.input_quantizer.freeze()
    with torch.no_grad():
        ref = conv(x)
        assert sqnr(ref, out) > sqnr(ref, single(x)) + 3


def _wrap(module):
    """A model around a lone quantized module, so that dmq.calibrate can run it."""
    holder = nn.Sequential(module)
    holder._dmq = dmq.api.QuantState(W8A8, None)
    return holder


def test_unet_split_points_match_the_runtime_concatenation():
    model = tiny_unet()
    seen = {}

    def hook(block_idx):
        def pre(mod, args, kwargs):
            hidden, res = args[0], args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
            res = list(res)
            h = hidden.shape[1]
            for j, r in enumerate(mod.resnets):
                skip = res.pop()
                seen[f"up_blocks.{block_idx}.resnets.{j}.conv1"] = h
                h = r.out_channels
                del skip
        return pre

    for i, ub in enumerate(model.up_blocks):
        ub.register_forward_pre_hook(hook(i), with_kwargs=True)
    backbone_loop(model, [500])(model)
    splits = dmq.unet_skip_splits(model)
    assert {k: v for k, v in splits.items() if k.endswith("conv1")} == seen
    q = dmq.quantize(model, "w8a8", inplace=False)
    for name, s in splits.items():
        assert q.get_submodule(name).split == s


def test_attention_processor_matches_diffusers_in_full_precision():
    model = tiny_dit()
    loop = backbone_loop(model, [300])
    with torch.no_grad():
        ref = loop(model)[0]
    cfg = dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", "token", dynamic=True))
    q = dmq.quantize(model, cfg, inplace=False)
    procs = [m.processor for m in q.modules() if hasattr(m, "matmul_quantizers")]
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs)
    for m in q.modules():
        if hasattr(m, "matmul_quantizers"):
            for sub in m.matmul_quantizers.children():
                sub.enabled = False
    with torch.no_grad():
        assert torch.allclose(loop(q)[0], ref, atol=1e-5)
        for m in q.modules():
            if hasattr(m, "matmul_quantizers"):
                for sub in m.matmul_quantizers.children():
                    sub.enabled = True
        out = loop(q)[0]
    assert 20 < sqnr(ref, out) < 80


def test_default_full_precision_list():
    q = dmq.quantize(tiny_unet(), "w8a8")
    assert type(q.conv_in) is nn.Conv2d and type(q.conv_out) is nn.Conv2d
    # one token per sample: quantized weight-only (group-wise), not kept
    for lin in (q.time_embedding.linear_1, q.down_blocks[0].resnets[0].time_emb_proj):
        assert isinstance(lin, QuantLinear) and lin.input_quantizer is None and lin.weight_spec.granularity == "group"
    d = dmq.quantize(tiny_dit(), "w8a8")
    blk = d.transformer_blocks[0]
    assert blk.norm1.linear.input_quantizer is None and type(d.proj_out_2) is nn.Linear
    assert type(blk.ff.net[2]) is not nn.Linear
    # overridable
    full = dmq.quantize(tiny_unet(), dmq.get_config("w8a8").replace(keep_fp=()))
    assert type(full.conv_in) is not nn.Conv2d


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_frozen_modules_run_under_grad_free_modes(mode):
    model = tiny_unet()
    loop = backbone_loop(model, [800, 200])
    q = dmq.freeze(dmq.calibrate(dmq.quantize(model, "w8a8"), loop))
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        outs = loop(q)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "w4a8-fp"])
@pytest.mark.parametrize("split", [None, 32])
def test_channelwise_dynamic_input_keeps_the_input_layout(preset, split):
    # quantizing along channels works channels-last; a dense input must come back dense, or every layer after the
    # convolution (GroupNorm above all, 15x slower on channels-last bfloat16 here) sees a strided tensor
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 16, 3, padding=1).to(torch.bfloat16)
    q = QuantConv2d.from_float(conv, dmq.get_config(preset), split=split)
    x = torch.randn(2, 64, 6, 6, dtype=torch.bfloat16) * torch.logspace(-2, 2, 64, dtype=torch.bfloat16)[:, None, None]
    with torch.no_grad():
        dense = q._quant_input(x)
        strided = q._quant_input(x.contiguous(memory_format=torch.channels_last))
        out = q(x)
    assert dense.is_contiguous() and out.is_contiguous()
    assert strided.is_contiguous(memory_format=torch.channels_last)  # a channels-last input keeps its layout too
    assert torch.equal(dense, strided)  # the same values either way
    assert not torch.equal(dense, x)  # and they are quantized
    ref = F.conv2d(dense, q.weight_fq, conv.bias, 1, 1)
    assert torch.equal(out, ref)
