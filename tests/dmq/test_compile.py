"""``torch.compile(model, fullgraph=True)`` of frozen (packed) models: no graph break for any preset, and the
compiled model computes what the eager one does.

The tests trace with the ``aot_eager`` backend: dynamo and AOT autograd see the whole model (packed weights as
tensor subclasses, timestep-bin lookups, dynamic block quantization), and the traced graph runs the same ATen ops as
eager mode, so outputs are equal bit for bit. Inductor's generated kernels are measured in
``scripts/bench_runtime.py`` (compiled against eager)."""

import pytest
import torch
from torch import nn

import dmq
from dmq.packed_weight import PackedWeight
from tests.dmq.helpers import backbone_loop, tiny_dit


def _compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("preset", dmq.preset_names())
def test_every_preset_compiles_without_graph_breaks(preset, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(4, 32)
    dmq.quantize(model, dmq.get_config(preset).replace(keep_fp=()))
    dmq.calibrate(model, lambda m: m(x))
    dmq.freeze(model)
    assert isinstance(model[0].weight, PackedWeight)
    with torch.no_grad():
        assert torch.equal(_compiled(model)(x), model(x))


def test_a_backbone_compiles_whole(one_thread):
    # a diffusers DiT: timestep-binned static scales (w8a8: 4 bins, two timesteps in different bins), the integer
    # GEMM, attention-matmul quantizers (U-Nets and the other presets compile too; see scripts/bench_runtime.py)
    model = tiny_dit()
    preset = "w8a8"
    loop = backbone_loop(model, [900, 100])
    dmq.calibrate(dmq.quantize(model, preset), loop)
    dmq.freeze(model)
    with torch.no_grad():
        # under tracing a layer runs the traceable path (torch._int_mm); eager mode's Python-side CPU kernels
        # (oneDNN, int4pack, tiles) are compared with the fake-quant reference in tests/dmq/test_kernels_cpu.py
        with dmq.kernels.disable("onednn_int8", "int4_weight", "tiled_dequant", "weight_cache"):
            eager = loop(model)
        compiled = loop(_compiled(model))
    assert not torch.equal(eager[0], eager[1])
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
