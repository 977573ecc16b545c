"""The one-pass native dynamic quantizers give the eager quantizers' result bit for bit, in the same memory layout,
for every input layout a backbone hands them; they decline what the eager path alone handles; and a frozen backbone
gives the same output with the path on and off."""

from __future__ import annotations

import diffusers
import pytest
import torch

import dmq
from dmq import formats, kernels, native, native_quant
from dmq.fake_quant import from_rows, quantize_rows_dynamic, to_rows
from tests.dmq.helpers import tiny_dit
from tests.dmq.test_activation_fast_paths import wide_range

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native16 path is off")

CASES = [("nvfp4", "block"), ("mxfp4", "block"), ("mxfp8_e5m2", "block"), ("mxfp6_e3m2", "block"),
         ("e4m3", "token"), ("e3m2", "token"), ("e5m2", "channel")]


def eager(x: torch.Tensor, dim: int, fmt, granularity: str, *paths: str) -> torch.Tensor:
    """What ``TensorQuantizer._dynamic`` computes without the native path (``paths``: more paths off)."""
    with kernels.disable("native16", *paths):
        q = from_rows(quantize_rows_dynamic(to_rows(x, dim), fmt, granularity, 32, True), x, dim)
        return q.contiguous() if x.is_contiguous() else q


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and torch.equal(a.view(torch.int16), b.view(torch.int16)))


def layouts(seed: int, short: int) -> list[tuple[torch.Tensor, int]]:
    """A Linear input, a convolution input (NCHW, channels-last, a channel slice of each), a sequence along its
    last dimension, rows of ``short`` elements (attention heads: the short-row loop, with a ragged last chunk),
    values over many binades with zeros and signed zeros."""
    x = wide_range(16 * 64, 64, torch.bfloat16, seed=seed)
    nchw = x.reshape(16, 64, 8, 8)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    heads = x.reshape(-1)[: x.numel() // (4 * short) * 4 * short].reshape(4, -1, short)
    return [(x, 1), (nchw, 1), (cl, 1), (nchw[:, 16:48], 1), (cl[:, :32], 1), (x.reshape(8, 128, 64), 2),
            (x.reshape(8, 128, 64) * 1e-30, 2), (heads, 2), (heads.transpose(0, 1), 2)]


@pytest.mark.parametrize("name,granularity", CASES)
def test_native_dynamic_is_the_eager_quantizer_bit_for_bit(name, granularity):
    fmt = formats.get(name)
    for seed in (0, 1):
        for x, dim in layouts(seed, short=32 if fmt.is_block else 24):
            got = native_quant.dynamic(x, dim, fmt, granularity, True)
            assert got is not None
            assert same(got, eager(x, dim, fmt, granularity))
            # and the reference with every fast path off (values; the layout is the eager path's)
            ref = eager(x, dim, fmt, granularity, "all")
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("name,granularity", CASES)
def test_native_dynamic_declines_what_only_the_eager_path_handles(name, granularity):
    fmt = formats.get(name)
    x = wide_range(64, 64, torch.bfloat16, seed=5)
    special = x.clone()
    special[3, 7] = float("nan")
    inf = x.clone()
    inf[9, 2] = -float("inf")
    for t in (special, inf):
        assert native_quant.dynamic(t, 1, fmt, granularity, True) is None
    assert native_quant.dynamic(x.half(), 1, fmt, granularity, True) is None
    assert native_quant.dynamic(x.float(), 1, fmt, granularity, True) is None
    assert native_quant.dynamic(x[:, :0], 1, fmt, granularity, True) is None
    assert native_quant.dynamic(x.clone().requires_grad_(), 1, fmt, granularity, True) is None
    for path in ("native16", "abs_amax", "block_chunked"):
        with kernels.disable(path):
            assert native_quant.dynamic(x, 1, fmt, granularity, True) is None
    if fmt.is_block:
        assert native_quant.dynamic(x[:, :40], 1, fmt, granularity, True) is None  # not a multiple of the block
    else:
        assert native_quant.dynamic(x, 1, fmt, "group", True) is None
        assert native_quant.dynamic(x, 1, fmt, granularity, False) is None
        assert native_quant.dynamic(x, 1, formats.FloatFormat(4, 3).with_bias(9), granularity, True) is None


def test_native_nvfp4_leaves_an_all_zero_tensor_to_the_eager_path():
    fmt = formats.get("nvfp4")
    z = torch.zeros(8, 32, dtype=torch.bfloat16)
    assert native_quant.dynamic(z, 1, fmt, "block", True) is None
    assert native_quant.dynamic(z, 1, formats.get("mxfp4"), "block", True) is not None  # MX takes zeros
    assert native_quant.dynamic(z, 1, formats.get("e4m3"), "token", True) is not None


def _tiny_unet16() -> diffusers.UNet2DModel:
    """Channel counts that are multiples of NVFP4's and MX's blocks, with attention and skip concatenations."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16, num_class_embeds=11,
    ).eval()


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "w4a8-fp"])
@pytest.mark.parametrize("model_fn", [_tiny_unet16, tiny_dit])
def test_frozen_backbone_output_is_unchanged_by_the_native_path(preset, model_fn, monkeypatch):
    model = model_fn().to(torch.bfloat16)
    q = dmq.quantize(model, preset)
    dmq.freeze(q)
    calls = []
    original = native.quant_blocks_bf16
    monkeypatch.setattr(native, "quant_blocks_bf16", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g).to(torch.bfloat16)
    args = (x, torch.tensor([10.0, 500.0, 900.0]))
    with torch.no_grad():
        out = q(*args, class_labels=torch.tensor([1, 2, 3])).sample
        assert calls, "the native quantizers did not run"
        with kernels.disable("native16"):
            ref = q(*args, class_labels=torch.tensor([1, 2, 3])).sample
        with kernels.disable("all"):
            fake = q(*args, class_labels=torch.tensor([1, 2, 3])).sample
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    # against the fake-quant reference, the tiled GEMMs' float32 accumulation order is the only difference
    assert (out.float() - fake.float()).abs().max() <= 0.05 * fake.float().abs().max()
