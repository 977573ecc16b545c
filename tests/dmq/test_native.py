"""The fused C loops of ``dmq.native`` equal the PyTorch passes they replace, bit for bit, over every 16-bit input
pattern; they decline what they do not cover; and a missing compiler or a failed build leaves them off without
changing any result."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from dmq import formats, kernels, native
from dmq.formats import grid

needs_lib = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native16 path is off")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def test_the_library_builds_where_a_compiler_exists():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    assert native.library() is not None


@needs_lib
@pytest.mark.parametrize("table_dtype", [torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32,
                                         torch.int32])
def test_gather_is_index_select_for_both_index_readings(table_dtype):
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(1 << 16, generator=g) * 1000).to(table_dtype) if table_dtype.is_floating_point else \
        torch.randint(-128 if table_dtype == torch.int8 else 0, 128 if table_dtype == torch.int8 else 256, (1 << 16,),
                      generator=g).to(table_dtype)
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16)
    shuffled = every[torch.randperm(1 << 16, generator=g)]
    for b in (every, shuffled):
        got = native.gather16(table, b, 0)
        assert torch.equal(got, table.index_select(0, b.to(torch.int32)))
        signed = b.view(torch.int16)
        got = native.gather16(table, b, 1 << 15)
        assert torch.equal(got, table.index_select(0, signed.to(torch.int32) + (1 << 15)))
    # grid.gather16 takes the loop for both of its index forms, and its PyTorch form agrees
    for b, off in ((shuffled, 0), (shuffled.view(torch.int16), 1 << 15)):
        with kernels.disable("native16"):
            ref = grid.gather16(table, b, off)
        assert torch.equal(grid.gather16(table, b, off), ref)


@needs_lib
def test_gather_declines_other_tables_and_indices():
    table = torch.randn(1 << 16)
    b = torch.arange(100, dtype=torch.int32).to(torch.uint16)
    assert native.gather16(table[:256], b, 0) is None  # not a 65536-entry table
    assert native.gather16(table.double(), b, 0) is None  # 8-byte entries
    assert native.gather16(table, b.to(torch.int32), 0) is None  # a 32-bit index
    assert native.gather16(table, b[::2], 0) is None  # strided


@needs_lib
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_absmax_is_the_masked_integer_maximum(dtype):
    every = grid.every16(dtype).reshape(-1, 16)
    ref = torch.bitwise_and(every.view(torch.int16), 0x7FFF).amax(-1, keepdim=True)
    assert torch.equal(bits(native.absmax16(every)), ref)
    rows = every.reshape(-1, 1024)
    ref = torch.bitwise_and(rows.view(torch.int16), 0x7FFF).amax(-1, keepdim=True)
    assert torch.equal(bits(native.absmax16(rows)), ref)
    assert native.absmax16(every.float()) is None
    assert native.absmax16(every.t()) is None  # not contiguous


def _scales(n: int, pow2: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    e = torch.randint(-130, 120, (n, 1), generator=g).float()
    m = torch.ones(n, 1) if pow2 else 1 + torch.rand(n, 1, generator=g)
    return (m * torch.exp2(e)).to(torch.bfloat16)


@needs_lib
@pytest.mark.parametrize("name", ["e4m3", "e2m1", "e3m2", "e5m2", "int8"])
@pytest.mark.parametrize("pow2", [True, False])
def test_round_div_is_the_pytorch_chunk_loop_over_every_pattern(name, pow2):
    spec = formats.get(name).grid
    every = grid.every16(torch.bfloat16)
    finite = every[(every.view(torch.int16) & 0x7F80) != 0x7F80].reshape(-1, 64)  # all finite patterns, 64 a row
    s = _scales(finite.shape[0], pow2)
    got = native.round_div_bf16(finite, s, spec, pow2)
    table = grid._table(spec, torch.bfloat16, signed=True)
    q = (finite * (1 / s) if pow2 else finite / s)  # the eager chunk loop's operations, whole-tensor
    ref = table.index_select(0, q.view(torch.int16).reshape(-1).to(torch.int32) + (1 << 15)).reshape(q.shape) * s
    assert torch.equal(bits(got), bits(ref))


@needs_lib
@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e3m2"])
def test_round_scaled_is_the_round_to_odd_lookup_over_every_pattern(name):
    spec = formats.get(name).grid
    every = grid.every16(torch.bfloat16)
    finite = every[(every.view(torch.int16) & 0x7F80) != 0x7F80].reshape(-1, 16)
    g = torch.Generator().manual_seed(4)
    d = (1 + torch.rand(finite.shape[0], 1, generator=g)) * torch.exp2(
        torch.randint(-100, 100, (finite.shape[0], 1), generator=g).float())
    got = native.round_scaled_bf16(finite, d, spec)
    ref = (formats.get(name).quantize(finite.float() / d) * d).to(torch.bfloat16)  # the arithmetic definition
    assert torch.equal(bits(got), bits(ref))
    with kernels.disable("native16"):
        chunked = grid.round_scaled16(finite.reshape(-1, 1, 16), d.reshape(-1, 1, 1), spec)
    assert torch.equal(bits(got), bits(chunked.reshape(got.shape)))


@needs_lib
def test_round_loops_hand_non_finite_values_back():
    spec = formats.get("e4m3").grid
    x = torch.ones(4, 16, dtype=torch.bfloat16)
    s = torch.ones(4, 1, dtype=torch.bfloat16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 5] = bad
        assert native.round_div_bf16(y, s, spec, False) is None
        assert native.round_scaled_bf16(y, s.float(), spec) is None
    s_bad = s.clone()
    s_bad[1] = float("inf")
    assert native.round_div_bf16(x, s_bad, spec, False) is None
    d0 = s.float().clone()
    d0[3] = 0.0
    assert native.round_scaled_bf16(x, d0, spec) is None
    # a grid with a scale (an exponent-biased format) is not one the C rounding takes
    biased = formats.FloatFormat(4, 3).with_bias(9).grid
    assert native.round_div_bf16(x, s, biased, False) is None


def test_no_compiler_leaves_the_path_off_and_results_unchanged(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("CC", "dmq-no-such-compiler")
    assert native.library() is None
    x = torch.randn(64, 64).to(torch.bfloat16)
    assert native.absmax16(x) is None and grid.abs_amax(x) is not None  # the PyTorch form runs
    fmt = formats.get("nvfp4")
    with kernels.disable("all"):
        ref = fmt.quantize(x)
    assert torch.equal(bits(fmt.quantize(x)), bits(ref))

    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails: logged, and the path stays off
    if shutil.which("false") is not None:
        with caplog.at_level(logging.WARNING, logger="dmq.native"):
            assert native.library() is None
        assert "building native16.c failed" in caplog.text
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv("DMQ_NATIVE", "0")
    assert native.library() is None


@needs_lib
def test_a_build_is_cached_per_source_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    assert native.library() is not None
    built = list(tmp_path.glob("native16-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_STATE", {})
    assert native.library() is not None  # loaded, not rebuilt
    assert list(tmp_path.glob("*")) == built and built[0].stat().st_mtime_ns == stamp


def _frozen_linear(preset: str, k: int, n: int, seed: int = 0) -> torch.nn.Module:
    import dmq

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).to(torch.bfloat16)
    q = dmq.quantize(model, preset)
    dmq.calibrate(q, lambda m: m(torch.randn(4, k).to(torch.bfloat16)))
    dmq.freeze(q)
    return q


@needs_lib
@pytest.mark.parametrize("preset,k", [("fp8", 1152), ("nvfp4", 1152), ("w4a16", 1152), ("mxfp4", 1152),
                                      ("w4a8-fp", 1152), ("w4a8-fp", 1000), ("nvfp4", 1008), ("w4a16", 1000)])
def test_dequantized_tiles_are_the_pytorch_tiles(preset, k):
    """Every output kind, one code a byte (FP8) and two (4-bit: groups of 16 and 32, per channel), widths that
    are not a multiple of 32 (the scalar tail after the AVX-512 steps) or of the group (a padded last group)."""
    q = _frozen_linear(preset, k, 96)
    rows = kernels._plan(q[0], torch.device("cpu"), torch.bfloat16).rows
    assert rows is not None and rows.native
    for dtype, gemm in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.bfloat16)):
        for r0, r1 in ((0, 96), (5, 37)):
            got = rows.rows_in(r0, r1, dtype, gemm)
            with kernels.disable("native16"):
                ref = rows.rows_in(r0, r1, dtype, gemm)
            assert got.dtype == ref.dtype and torch.equal(got, ref)
    full = rows.rows_in(0, 96, torch.bfloat16, torch.bfloat16)
    assert torch.equal(full, q[0].dequantized_weight(torch.bfloat16).reshape(96, k))  # the reference's weight


@needs_lib
@pytest.mark.parametrize("preset", ["fp8", "nvfp4", "w4a16", "mxfp4", "w4a8-fp"])
@pytest.mark.parametrize("m", [1, 2, 8])
def test_few_row_product_is_within_the_tiled_bound(preset, m, monkeypatch):
    """The fused dequantize-and-multiply loop for a few rows (the per-sample layers at small batch) against the
    exact product of the same operands: within (K + 1) u sum |x| |w| + u_bf16 |y|, as the tiled path."""
    k, n = 1152, 300
    q = _frozen_linear(preset, k, n, seed=m)
    layer = q[0]
    calls = []
    gemv = native.dequant_gemv
    monkeypatch.setattr(native, "dequant_gemv", lambda *a, **kw: calls.append(1) or gemv(*a, **kw))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        assert calls, "the few-row loop did not run"
        xq = layer.input_quantizer(x) if layer.input_quantizer is not None else x
        w = layer.dequantized_weight(torch.bfloat16).double()
    exact = xq.double() @ w.T + layer.bias.double()
    bound = (k + 1) * 2.0**-24 * (xq.double().abs() @ w.abs().T + layer.bias.double().abs()) + 2.0**-8 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all()
    calls.clear()
    with torch.no_grad():
        q(torch.randn(native.GEMV_MAX_ROWS + 1, k).to(torch.bfloat16))
    assert not calls  # more rows: tiles


@needs_lib
def test_few_row_product_declines_what_it_does_not_take():
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    table = torch.arange(256, dtype=torch.float32)
    scales = torch.ones(4, 1)
    x = torch.ones(2, 32)
    assert native.dequant_gemv(x, codes, table, scales, 32, None, torch.bfloat16) is not None
    assert native.dequant_gemv(torch.ones(9, 32), codes, table, scales, 32, None, torch.bfloat16) is None
    assert native.dequant_gemv(x.double(), codes, table, scales, 32, None, torch.bfloat16) is None
    assert native.dequant_gemv(x, codes, table, scales, 32, torch.ones(3), torch.bfloat16) is None  # bias size
    assert native.dequant_gemv(x, codes, table, scales, 32, None, torch.float16) is None  # no float16 rounding
    y = native.dequant_gemv(x, codes + 3, table, scales * 0.5, 32, torch.ones(4), torch.float32)
    assert torch.equal(y, torch.full((2, 4), 32 * 1.5 + 1))


@needs_lib
@pytest.mark.parametrize("m", [2, 64])
def test_int8_group_weights_read_as_their_own_values(m):
    """INT8 group-wise weight-only layers (the presets' per-sample layers): codes converted, not looked up; the
    tiles are the PyTorch tiles bit for bit, and a few rows' product stays within the tiled bound."""
    import dmq
    from dmq.config import QuantConfig, QuantSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1152, 200)).to(torch.bfloat16)
    q = dmq.quantize(model, QuantConfig(weight=QuantSpec("int8", "group", group_size=32), act=None))
    dmq.freeze(q)
    rows = kernels._plan(q[0], torch.device("cpu"), torch.bfloat16).rows
    assert rows.direct is not None and rows.direct.dtype == torch.int8
    got = rows.rows_in(0, 200, torch.bfloat16, torch.float32)
    with kernels.disable("native16"):
        assert torch.equal(got, rows.rows_in(0, 200, torch.bfloat16, torch.float32))
    x = torch.randn(m, 1152).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        with kernels.disable("native16"):
            y_ref = q(x)
    w = q[0].dequantized_weight(torch.bfloat16).double()
    exact = x.double() @ w.T + q[0].bias.double()
    bound = 1153 * 2.0**-24 * (x.double().abs() @ w.abs().T + q[0].bias.double().abs()) + 2.0**-8 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all() and ((y_ref.double() - exact).abs() <= bound).all()


@needs_lib
def test_byte_codes_without_a_table_are_exact_conversions():
    g = torch.Generator().manual_seed(9)
    s = torch.rand(6, 3, generator=g) * 0.1
    for dtype in (torch.int8, torch.uint8):
        codes = torch.randint(-128 if dtype == torch.int8 else 0, 128 if dtype == torch.int8 else 256, (6, 96),
                              generator=g).to(dtype)
        want = (codes.float().reshape(6, 3, 32) * s.unsqueeze(-1)).reshape(6, 96)
        assert torch.equal(native.dequant_rows(codes, None, s, 32, 96, torch.float32, torch.float32), want)
        got = native.dequant_rows(codes, None, s, 32, 90, torch.bfloat16, torch.float32)
        assert torch.equal(got, want[:, :90].to(torch.bfloat16).float())
    assert native.dequant_rows(codes.to(torch.int16), None, s, 32, 96, torch.float32, torch.float32) is None


def test_the_path_is_listed_and_scoped():
    assert "native16" in kernels.PATHS
    with kernels.disable("native16"):
        assert not kernels.enabled("native16")
    with kernels.disable("all"):
        assert not kernels.enabled("native16")
    assert kernels.enabled("native16")


@needs_lib
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_integer_epilogue_is_the_pytorch_epilogue(dtype, per_sample, zero_point, bias, monkeypatch):
    """The fused epilogue of the integer GEMM: the correction, the conversion, the scale product and the bias (one
    fused multiply-add, as addcmul's) in one loop, bit for bit the four PyTorch passes; one scale for all rows or
    one per sample, chunks of INT_ROWS rows included."""
    g = torch.Generator().manual_seed(7)
    k, n = 96, 130
    monkeypatch.setattr(kernels, "INT_ROWS", 256)  # three chunks, the last a short one
    x = torch.randn(2, 300, k, generator=g).to(dtype)
    batch = 2 if per_sample else 1
    scale = torch.rand(batch, 1, 1, generator=g) * 0.05 + 0.01
    zp = torch.randint(100, 150, (batch, 1, 1), generator=g).float() if zero_point else None
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    calls = []
    fused = native.int_epilogue
    monkeypatch.setattr(native, "int_epilogue", lambda *a: calls.append(1) or fused(*a))
    y = kernels.int_linear(x, scale, zp, 8, False, w, w_scale, w.to(torch.int32).sum(1), b)
    assert len(calls) == 3 and y.shape == (2, 300, n)
    with kernels.disable("native16"):
        ref = kernels.int_linear(x, scale, zp, 8, False, w, w_scale, w.to(torch.int32).sum(1), b)
    assert torch.equal(y, ref)


@needs_lib
def test_integer_epilogue_declines_what_it_does_not_take():
    acc = torch.zeros(4, 8, dtype=torch.int32)
    s, c, ws, rs = torch.ones(1), torch.ones(1, dtype=torch.int32), torch.ones(8), torch.ones(8, dtype=torch.int32)
    assert native.int_epilogue(acc, s, c, ws, rs, None, torch.empty(4, 8, dtype=torch.bfloat16))
    assert not native.int_epilogue(acc, s, c, ws, rs, None, torch.empty(4, 8, dtype=torch.float16))
    assert not native.int_epilogue(acc.float(), s, c, ws, rs, None, torch.empty(4, 8))
    assert not native.int_epilogue(acc, torch.ones(3), None, ws, rs, None, torch.empty(4, 8))  # 3 scales, 4 rows
    assert not native.int_epilogue(acc, s, c, ws[:7], rs, None, torch.empty(4, 8))
    assert not native.int_epilogue(acc, s, c.long(), ws, rs, None, torch.empty(4, 8))
    assert not native.int_epilogue(acc, s, c, ws, rs, torch.ones(8).double(), torch.empty(4, 8))
    out = torch.empty(4, 8)
    assert native.int_epilogue(acc + 3, torch.full((4,), 0.5), torch.full((4,), 2, dtype=torch.int32), ws, rs,
                               torch.ones(8), out)
    assert torch.equal(out, torch.full((4, 8), (3 + 2) * 0.5 + 1))


def _every_loop(seed: int) -> list[torch.Tensor]:
    """One large call of every loop (several thread parts each), on random data."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, 33, 96, generator=g) * 3).to(torch.bfloat16)
    table2 = torch.randn(1 << 16, generator=g).to(torch.bfloat16)
    nv, mx, e4m3 = formats.get("nvfp4"), formats.get("mxfp4"), formats.get("e4m3")
    codes = torch.randint(0, 256, (700, 96), generator=g, dtype=torch.uint8)
    table = torch.randn(256, 2, generator=g)
    scales = torch.rand(700, 12, generator=g)
    acc = torch.randint(-(1 << 20), 1 << 20, (700, 300), generator=g, dtype=torch.int32)
    epi = torch.empty(700, 300, dtype=torch.bfloat16)
    native.int_epilogue(acc, torch.rand(700, generator=g), torch.randint(-5, 5, (700,), generator=g,
                        dtype=torch.int32), torch.rand(300, generator=g), torch.randint(-99, 99, (300,), generator=g,
                        dtype=torch.int32), torch.randn(300, generator=g), epi)
    flat = x.reshape(-1, 96)
    out = [
        native.gather16(table2, x.view(torch.uint16).reshape(-1), 0),
        native.absmax16(flat),
        native.round_div_bf16(flat, (native.absmax16(flat) + 1).to(torch.bfloat16), e4m3.grid, False),
        native.round_scaled_bf16(flat, flat.abs().amax(1, keepdim=True).float() + 1, nv.element.grid),
        native.quant_blocks_bf16(x, 2, 16, native.NVFP4, nv.element.grid, nv.element.max, e4m3.grid,
                                 e4m3.min_subnormal),
        native.quant_blocks_bf16(x, 1, 33, native.TOKEN, e4m3.grid, e4m3.max),  # (64, 33, 96): positions inner
        native.quant_blocks_bf16(x, 2, 32, native.MX, mx.element.grid, mx.element.max, emax=mx.element.emax),
        native.dequant_rows(codes, table, scales, 16, 190, torch.bfloat16, torch.float32),
        native.dequant_gemv(torch.randn(3, 190, generator=g), codes, table, scales, 16, None, torch.float32),
        native.gather16_split(table2, table2.flip(0), x, 20),
        native.unpack_s4(codes, 191),
        epi,
    ]
    assert all(t is not None for t in out)
    return out


@needs_lib
def test_every_thread_count_gives_the_same_bits():
    """The loops split their rows or blocks over torch.get_num_threads() threads; no result depends on the split."""
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _every_loop(0)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_lib
def test_without_openmp_the_loops_start_their_own_threads(monkeypatch, tmp_path):
    """A compiler without OpenMP: the build takes the next thread flags (POSIX threads), and the loops still split
    over threads with the same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = _every_loop(1)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("DMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "THREAD_FLAGS", (("-fdmq-no-such-flag",), ("-pthread",)))
    lib = native.library()
    assert lib is not None and len(list(tmp_path.glob("native16-*.so"))) == 1
    torch.set_num_threads(2)
    try:
        threaded = _every_loop(1)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(serial, threaded):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
