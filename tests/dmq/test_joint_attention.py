"""SD3 joint attention: with pass-through quantizers the quantized processor computes what diffusers'
JointAttnProcessor2_0 computes; with INT8 operands it stays close but differs."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

import dmq
from dmq.joint_attention import QuantJointAttnProcessor

CONFIG = dmq.QuantConfig(weight=None, attn=dmq.QuantSpec("int8", "tensor"), keep_fp=(), name="attn-int8")


def joint_attention(context_pre_only: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=None, added_kv_proj_dim=16, dim_head=8, heads=2, out_dim=16,
                     context_pre_only=context_pre_only, bias=True, qk_norm="rms_norm", eps=1e-6,
                     processor=JointAttnProcessor2_0()).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 12, 16, generator=g), torch.randn(2, 5, 16, generator=g)


class Wrapper(torch.nn.Module):
    """A top-level module with a timestep argument, as dmq.quantize expects of a backbone."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, timestep, context):
        return self.attn(x, encoder_hidden_states=context)


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_identity_quantizers_reproduce_the_diffusers_processor(context_pre_only):
    model = Wrapper(joint_attention(context_pre_only))
    x, c = inputs()
    with torch.no_grad():
        ref = model(x, torch.tensor([500.0]), c)
        dmq.quantize(model, CONFIG)
        assert isinstance(model.attn.processor, QuantJointAttnProcessor)
        assert dmq.summary(model)["attention"] == 1 and dmq.summary(model)["layers"] == 0
        for q in dmq.quantizers(model).values():
            q.enabled = False
        out = model(x, torch.tensor([500.0]), c)
    if context_pre_only:
        assert out[1] is None or out[1].shape == c.shape
    for a, b in zip(out, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    dmq.restore(model)
    assert type(model.attn.processor) is JointAttnProcessor2_0


def test_int8_operands_are_close_and_calibrated():
    model = Wrapper(joint_attention(False))
    x, c = inputs()
    with torch.no_grad():
        ref = model(x, torch.tensor([500.0]), c)
        dmq.quantize(model, CONFIG)
        dmq.calibrate(model, lambda m: m(x, torch.tensor([500.0]), c))
        dmq.freeze(model)
        out = model(x, torch.tensor([500.0]), c)
    for a, b in zip(out, ref):
        sqnr = 10 * torch.log10(b.pow(2).sum() / (a - b).pow(2).sum())
        assert 25 < float(sqnr) < 100
