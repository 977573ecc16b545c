"""Real low-bit GEMMs of frozen layers, and the one seam a frozen Linear calls: :func:`frozen_linear`.

INT activations x INT weights (Jacob et al. 2018, eq. 7): with activation codes ``q_a`` (scale ``s_a``, zero point
``z``) and weight codes ``q_w`` (per-output-channel scale ``s_w``, symmetric),

    y[m, n] = s_a s_w[n] * sum_k (q_a[m, k] - z) q_w[n, k] + b[n]
            = s_a s_w[n] * ( (q_a - c) @ q_w^T [m, n]  +  (c - z) * rowsum(q_w)[n] ) + b[n].

The sum is exact in int32 on every path; the only roundings are the float32 epilogue (int32 -> float32, the scale
product, the bias) and the final cast. ``s_a`` is the activation scale *in the input's dtype*, exactly the scale the
fake quantizer divides and multiplies by (:func:`dmq.fake_quant.fake_quant` uses ``scale.to(x.dtype)``).

Execution paths of a frozen ``QuantLinear``, tried in this order (each can be turned off with :func:`disable`, and
each falls back to the next when its kernel is missing or declines the shape):

- ``onednn_int8``: INT weights (8 or 4 bit, per channel) x static per-tensor INT activations (<= 8 bit) on oneDNN's
  u8 x s8 VNNI GEMM with the scales and bias fused (:mod:`dmq.kernels_cpu`); CPU, one timestep bin per call; only
  after :func:`prepack_weights` (its weight is a second copy, in oneDNN's blocked int8 layout). Frozen ``Conv2d``
  layers of the same kind use oneDNN's int8 convolution the same way (:func:`frozen_conv`).
- ``int_gemm``: the same on ``torch._int_mm`` with the epilogue below (CPU and CUDA; per-sample timestep bins).
- ``fp8_gemm``: FP8 E4M3 on ``torch._scaled_mm`` (CUDA, compute capability 8.9+).
- ``int4_weight``: weight-only INT4 group-wise (W4A16) dequantized inside the GEMM (``_weight_int4pack_mm_for_cpu``),
  for inputs of fewer than ``kernels_cpu.INT4_MAX_ROWS`` rows (more rows amortize a tile dequantization better);
  only after :func:`prepack_weights` (its weight is a second copy, in the kernel's int4pack layout).
- ``weight_cache``: a dequantized copy of the weight in the compute dtype, only after :func:`cache_weights`
  (a memory trade-off the user sets; off by default; bit-identical to the reference).
- ``tiled_dequant``: any other packed weight, one cache-sized tile of rows at a time: one table lookup per code byte
  and one scale multiply (:class:`dmq.packed.RowDequantizer`), rounded to the compute dtype (the reference's
  weight) and multiplied in float32 on CPUs without AMX (:func:`dmq.kernels_cpu.tile_gemm_dtype`).
- otherwise the reference: the fake-quantized input times the whole weight dequantized (bit for bit the fake-quant
  model).

Per-layer kernel state (the weight row sums, float32 scales, the per-bin activation scales; the prepacked oneDNN /
int4pack weights and the dequantized copies where the user asked for them) is built once at freeze or load
(:func:`prepare`) and kept in a plain attribute that is neither a parameter nor a buffer: the state_dict and the
checkpoint format do not change, and a moved or reloaded layer rebuilds it. By default no path keeps a second copy
of a weight, so a frozen model's memory is its packed tensors plus a few vectors per layer (:func:`kernel_bytes`);
the copies that buy speed (:func:`prepack_weights`, :func:`cache_weights`) are the user's memory trade-off, measured
in docs/runtime.md and docs/memory.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dmq import formats, kernels_cpu, native
from dmq.formats.grid import DISABLED as _DISABLED
from dmq.formats.grid import gather16
from dmq.memo import InputMemo
from dmq.packed import _dequant_rows, int_codes, row_dequantizer

logger = logging.getLogger(__name__)

# the Linear paths below, then the element-rounding lookups of every fake quantizer (dmq.formats.grid), the reuse
# of one input's dynamic quantization and GEMM cast by the layers that share it (dmq.memo), a static quantizer's
# whole fake quantization as one lookup per timestep bin (dmq.quantizer), absolute maxima of 16-bit tensors on their
# bit patterns (dynamic and block scales, dmq.formats.grid.abs_amax), MX blocks computed in bfloat16
# (dmq.formats.block), NVFP4 / MX / per-token FP quantization one cache-sized chunk of rows at a time
# (dmq.formats.grid.round_scaled16, round_div16), and the fused C form of these loops and of the weight tiles
# (dmq.native, dmq.native_quant; built with the system C compiler, off without one)
PATHS = ("onednn_int8", "int_gemm", "fp8_gemm", "int4_weight", "weight_cache", "tiled_dequant", "grid_table",
         "input_memo", "static_table", "abs_amax", "mx_16bit", "block_chunked", "native16")
_WARNED: set[str] = set()
_CAST = InputMemo()  # the last tiled-path input in its GEMM dtype


@contextlib.contextmanager
def disable(*paths: str):
    """Run the enclosed code with the named execution paths off (see :data:`PATHS`; ``"all"`` names every one);
    layers fall back to the next path, and with every path off to the reference (the fake-quant computation, bit
    for bit)."""
    if "all" in paths:
        paths = PATHS
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise ValueError(f"unknown execution path(s) {bad}; valid: {PATHS}")
    before = set(_DISABLED)
    _DISABLED.update(paths)
    try:
        yield
    finally:
        _DISABLED.clear()
        _DISABLED.update(before)


def enabled(path: str) -> bool:
    return path not in _DISABLED


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b_t^T`` for int8 ``a`` ``(M, K)`` and int8 ``b_t`` ``(N, K)``, as int32 ``(M, N)``.

    ``torch._int_mm`` on CPU (any shape) and on CUDA (M > 16, K and N multiples of 8; M is padded up to 17 rows);
    otherwise a float64 matmul, exact while ``K * 127 * 128 < 2^53``.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if a.is_cuda:
        if k % 8 == 0 and n % 8 == 0:
            pad = max(0, 17 - m)
            ap = torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a
            return torch._int_mm(ap, b_t.t())[:m]
    elif hasattr(torch, "_int_mm") and k > 1:  # CPU _int_mm returns wrong sums for K = 1 (torch 2.14, N > 1)
        return torch._int_mm(a, b_t.t())
    return (a.double() @ b_t.double().t()).to(torch.int32)


def act_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """The codes of the static INT fake quantizer, ``clamp(round(x / s + z))``, computed in ``x``'s dtype exactly as
    :func:`dmq.fake_quant.fake_quant` computes them (round half to even, saturating)."""
    t = x / scale.to(x.dtype)
    if zp is not None:
        t = t + zp.to(x.dtype)
    return torch.round(t).clamp_(qmin, qmax)


# output rows per chunk of the integer GEMM: the int32 accumulator and its float epilogue stay in L3. 512 rows (a DiT
# at batch 2 in one GEMM) beat 256 by 5-15% a layer at 512 and 4096 rows (2 threads, 1152..4608 wide).
INT_ROWS = 512


def int_linear(x: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor | None, a_bits: int, a_signed: bool,
               w_codes: torch.Tensor, w_scale: torch.Tensor, w_rowsum: torch.Tensor, bias: torch.Tensor | None,
               a_codes: tuple[torch.Tensor, int] | None = None, epilogue: Epilogue | None = None) -> torch.Tensor:
    """``y = Q_a(x) Q_w(W)^T + b`` through an integer GEMM.

    Args:
        x: ``(B, ..., K)`` float input.
        a_scale, a_zp: the activation quantizer's scale and zero point, shaped ``(B or 1, 1, ..., 1)``.
        a_bits, a_signed: the activation INT grid (unsigned codes are offset by ``2^(bits-1)``).
        w_codes: int8 ``(N, K)`` weight codes; ``w_scale``: float32 ``(N,)``; ``w_rowsum``: int32 ``(N,)``.
        a_codes: ``(q_a - c, c)``, the int8 activation codes ``(M, K)`` already offset by ``c`` (a lookup,
            :func:`_table_codes`), instead of computing them from ``x``.
        epilogue: the constants of one scale and zero point per call, as :func:`_epilogue` builds them (the
            same values this function computes; a layer's plan keeps them per timestep bin).

    Per row: ``acc = int_mm(q_a - c, q_w)`` (exact int32), ``acc += (c - z) * rowsum`` (exact), then
    ``y = float32(acc) * (float32(s_a) * s_w) + b``, rounded once to ``x``'s dtype. Rows go in chunks of ``INT_ROWS``;
    the epilogue of a chunk is one fused C loop where :func:`dmq.native.int_epilogue` takes it (the same roundings,
    bit for bit), else four PyTorch passes.
    """
    k, n = x.shape[-1], w_codes.shape[0]
    lead = x.shape[:-1]
    if a_codes is not None:
        a, off = a_codes
    else:
        qmin, qmax = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if a_signed else (0, 2**a_bits - 1)
        off = _code_offset(a_bits, a_signed)
        a = act_codes(x, a_scale, a_zp, qmin, qmax).sub_(off).to(torch.int8).reshape(-1, k)
    m = a.shape[0]
    per_sample = epilogue is None and a_scale.numel() > 1
    w_rowsum = w_rowsum.to(torch.int32)  # an int64 sum would make every correction a promoting add
    if per_sample:
        # per-row activation scale and zero-point offset (one value per sample, repeated over its tokens; no offset
        # for signed codes without a zero point)
        rows_per_sample = m // a_scale.shape[0]
        s_rows = a_scale.to(x.dtype).to(torch.float32).reshape(-1, 1).repeat_interleave(rows_per_sample, 0)
        c_rows = None
        if off or a_zp is not None:
            z = torch.zeros_like(a_scale) if a_zp is None else a_zp.reshape(a_scale.shape)
            c_rows = (off - z.to(torch.int32)).reshape(-1, 1).repeat_interleave(rows_per_sample, 0)
    else:
        ep = epilogue if epilogue is not None else _epilogue(a_scale, a_zp, off, x.dtype, w_scale, w_rowsum)
        s_rows, c_rows = ep.s_a, ep.c
    b = None if bias is None else bias.detach().to(torch.float32)  # inference kernel: no autograd graph
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for r0 in range(0, m, INT_ROWS):
        r1 = min(m, r0 + INT_ROWS)
        acc = int_mm(a[r0:r1], w_codes)
        s_r = s_rows[r0:r1] if per_sample else s_rows
        c_r = c_rows[r0:r1] if per_sample and c_rows is not None else c_rows
        if enabled("native16") and native.int_epilogue(acc, s_r, c_r, w_scale, w_rowsum, b, out[r0:r1]):
            continue
        if per_sample:
            sw = s_r * w_scale
            corr = None if c_r is None else c_r * w_rowsum
        else:
            sw, corr = ep.sw, ep.corr
        if corr is not None:
            acc.add_(corr)
        f = acc.to(torch.float32)
        if b is None:
            f.mul_(sw)
        else:
            torch.addcmul(b, f, sw, out=f)
        out[r0:r1] = f
    return out.reshape(*lead, n)


def _code_offset(a_bits: int, a_signed: bool) -> int:
    """What :func:`int_linear` subtracts from unsigned activation codes to fit them in int8 (0 for signed ones)."""
    return 0 if a_signed else 2 ** (a_bits - 1)


class Epilogue(NamedTuple):
    """:func:`int_linear`'s per-call constants for one activation scale and zero point: ``s_a`` ``float32(s_a)``
    ``(1, 1)``, ``c`` the zero-point offset ``c - z`` ``(1, 1)`` int32 (None when it is 0), and what the PyTorch
    epilogue multiplies and adds: ``sw = s_a * s_w`` ``(1, N)`` and ``corr = c * rowsum`` ``(1, N)`` int32 (None
    with ``c``)."""

    s_a: torch.Tensor
    c: torch.Tensor | None
    sw: torch.Tensor
    corr: torch.Tensor | None


def _epilogue(a_scale: torch.Tensor, a_zp: torch.Tensor | None, off: int, dtype: torch.dtype,
              w_scale: torch.Tensor, w_rowsum: torch.Tensor) -> Epilogue:
    """The :class:`Epilogue` of one activation scale and zero point, with ``s_a`` rounded to the compute ``dtype``
    first, as the fake quantizer uses it (a float32 scale here was a systematic mismatch of up to 2^-9 relative per
    layer in bfloat16); the correction is int32, since an int64 row sum would make every correction a promoting
    add."""
    s = a_scale.reshape(-1)[:1].to(dtype).to(torch.float32).reshape(1, 1)
    if not off and a_zp is None:
        return Epilogue(s, None, s * w_scale, None)
    z = 0 if a_zp is None else a_zp.reshape(-1)[:1].to(torch.int32).reshape(1, 1)
    c = torch.full((1, 1), off, dtype=torch.int32, device=a_scale.device) - z
    return Epilogue(s, c, s * w_scale, c * w_rowsum.to(torch.int32))


def fp8_supported(device: torch.device) -> bool:
    """``torch._scaled_mm`` with FP8 E4M3 operands: CUDA devices of compute capability 8.9 (Ada) or newer."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, a_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor | None:
    """``y = (s_a Q(x / s_a)) (s_w Q_w)^T + b`` on ``torch._scaled_mm`` with row-wise scales; ``None`` when the
    device, the shapes or a per-sample activation scale rule it out (the caller then dequantizes)."""
    if not (enabled("fp8_gemm") and fp8_supported(x.device)) or a_scale.numel() != 1:
        return None
    k = x.shape[-1]
    n = w_fp8.shape[0]
    if k % 16 or n % 16:
        return None
    lead = x.shape[:-1]
    a = (x.reshape(-1, k) / a_scale.reshape(()).to(x.dtype)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    m = a.shape[0]
    sa = a_scale.reshape(1, 1).to(torch.float32).expand(m, 1).contiguous()
    sb = w_scale.reshape(1, n).to(torch.float32)
    try:
        y = torch._scaled_mm(a, w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError) as e:  # an older torch without row-wise scaling, or an unsupported layout
        _warn_once("fp8", "torch._scaled_mm failed (%s): FP8 layers dequantize instead", e)
        _DISABLED.add("fp8_gemm")
        return None
    y = y.to(x.dtype).reshape(*lead, n)
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------------------ layer seam
class _Plans:
    """Per-layer kernel state by (device, dtype); never copied, pickled or saved (a copy rebuilds its own)."""

    def __init__(self) -> None:
        self.by_key: dict = {}
        self.cache_weights = False
        self.prepack = False
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> _Plans:
        out = _Plans()
        out.cache_weights, out.prepack = self.cache_weights, self.prepack
        return out

    def __getstate__(self) -> dict:
        return {"cache_weights": self.cache_weights, "prepack": self.prepack}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.cache_weights = state.get("cache_weights", False)
        self.prepack = state.get("prepack", False)


class _Plan:
    """What one packed Linear needs per call, computed once: see :func:`prepare`."""

    int_act = False  # INT weight x static per-tensor INT activation
    onednn = None  # prepacked oneDNN weight
    int4 = None  # (int4pack weight, scales-and-zeros, group size)
    rows = None  # packed.RowDequantizer of the tiled path
    cache = None  # dequantized weight (weight_cache)
    conv_rows = None  # a float convolution's RowDequantizers, one per part (_conv_weight)
    split_key = None  # _Pair of the two static tables split_table was built from (_split_lookup)
    split_table = None  # those two tables, concatenated
    epilogue = None  # ((bin, dtype, offset), int_linear's epilogue constants) of the last bin (_int_path)


def _plans(layer) -> _Plans:
    p = layer.__dict__.get("_dmq_kernel_plans")
    if p is None:
        p = layer.__dict__["_dmq_kernel_plans"] = _Plans()
    return p


def _state_key(layer, device: torch.device, dtype: torch.dtype) -> tuple:
    """Identity of the tensors a plan is derived from: a reload (``copy_`` bumps ``_version``) or a move rebuilds."""
    key = [device, dtype]
    w = layer._parameters.get("weight")
    tensors = list(w.tensors().values()) if hasattr(w, "tensors") else []
    for name in ("input_quantizer", "input_quantizer_skip"):  # the second: a split convolution's skip half
        q = getattr(layer, name, None)
        if q is not None:
            tensors += [q.scale, q.zero_point]
    for t in tensors:
        try:
            key += [t.data_ptr(), t._version]
        except RuntimeError:  # an inference tensor has no version counter
            key += [t.data_ptr(), -1]
    return tuple(key)


def _plan(layer, device: torch.device, dtype: torch.dtype) -> _Plan:
    plans = _plans(layer)
    key = _state_key(layer, device, dtype)
    plan = plans.by_key.get(key)
    if plan is None:
        with plans.lock:
            plan = plans.by_key.get(key)
            if plan is None:
                plan = _build_plan(layer, device, dtype, plans.cache_weights, plans.prepack)
                plans.by_key = {key: plan}  # one device and dtype at a time: a move frees the old state
    return plan


def _int_act_plan(plan: _Plan, layer, q, dtype: torch.dtype, part: int = 0) -> torch.Tensor:
    """Fill the INT-activation fields of ``plan`` (per-bin scales and zero points, the weight's float32 scales) for
    weight part ``part`` read by quantizer ``q``; returns that part's int8 codes ``(N, K)``."""
    lay = layer.weight_layouts[part]
    plan.int_act = True
    af = q.fmt
    plan.a_bits, plan.a_signed = af.bits, af.signed
    plan.off = 2 ** (af.bits - 1) if af.signed else 0  # signed codes + off = unsigned codes for oneDNN
    plan.qmin, plan.qmax = (af.qmin, af.qmax)
    codes = int_codes(layer._part(part), lay)
    plan.w_scale = layer._part(part)["weight_scale"].to(torch.float32).reshape(-1).expand(lay.rows).contiguous()
    # per timestep bin: the scale in the compute dtype (what the fake quantizer uses) and the zero point
    plan.s_t = [s.to(dtype).reshape(1, 1) for s in q.scale]
    plan.s_f = [float(s) for s in plan.s_t]
    sym = q.spec.symmetric
    plan.z_t = [None if sym else z.to(dtype).reshape(1, 1) for z in q.zero_point]
    plan.z_i = [0 if sym else int(z) for z in q.zero_point]
    return codes


def _build_plan(layer, device: torch.device, dtype: torch.dtype, cache: bool, prepack: bool) -> _Plan:
    plan = _Plan()
    lays = layer.weight_layouts or ()
    q = getattr(layer, "input_quantizer", None)
    if isinstance(layer, torch.nn.Conv2d):  # one sub-plan per weight part (two for a shortcut split)
        plan.parts = []
        if (prepack and device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and int_conv_ok(layer)
                and enabled("onednn_int8") and kernels_cpu.onednn_conv_ok()):
            conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
            for i, qi in enumerate(_conv_quantizers(layer)):
                sub = _Plan()
                codes = _int_act_plan(sub, layer, qi, dtype, i)
                sub.onednn = kernels_cpu.prepack_conv(codes.reshape(layer.out_channels, -1, *layer.kernel_size),
                                                      conv)
                sub.conv = conv
                plan.parts.append(sub)
        if not plan.parts and lays:  # the float convolution's weight, one lookup and one scale pass per part
            rows = [row_dequantizer(layer._part(i), lay) for i, lay in enumerate(lays)]
            plan.conv_rows = rows if None not in rows else None
        return plan
    plan.n, plan.k = layer.out_features, layer.in_features
    if getattr(layer, "exec_path", "dequant") == "int_gemm" and len(lays) == 1:
        lay = lays[0]
        codes = _int_act_plan(plan, layer, q, dtype)
        plan.codes = codes if lay.storage == "int8" else None  # 4-bit codes are unpacked again only on fallback
        plan.rowsum = codes.to(torch.int32).sum(1, dtype=torch.int32)
        if (prepack and device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and enabled("onednn_int8")
                and kernels_cpu.onednn_int8_ok()):
            plan.onednn = kernels_cpu.prepack_int8(codes)
        return plan
    if len(lays) == 1:  # the tiled path's one-pass dequantization (None: a layout it does not cover)
        plan.rows = row_dequantizer(layer._part(0), lays[0])
    if prepack and len(lays) == 1 and q is None and device.type == "cpu":
        lay = lays[0]
        fmt = lay.fmt
        if (isinstance(fmt, formats.IntFormat) and fmt.bits == 4 and fmt.signed and lay.symmetric
                and lay.granularity == "group" and lay.padded_cols == lay.cols and kernels_cpu.int4_weight_ok()):
            part = layer._part(0)
            packed = kernels_cpu.prepack_int4(int_codes(part, lay), part["weight_scale"], lay.group_size, dtype)
            if packed is not None:
                plan.int4 = (*packed, lay.group_size)
    if cache and lays:
        plan.cache = layer.dequantized_weight(dtype).to(device)
    return plan


def forget(layer) -> None:
    """Drop a layer's kernel state, keeping its ``cache_weights`` choice: its packed tensors were overwritten in
    place (``load_state_dict`` copies without bumping the version counters the state is keyed on)."""
    plans = layer.__dict__.get("_dmq_kernel_plans")
    if plans is not None:
        with plans.lock:
            plans.by_key = {}


def prepare(layer) -> None:
    """Build a frozen layer's kernel state for its current device and dtype (called at freeze and load; a call in
    another dtype or after a move builds its own on first use)."""
    lays = layer.weight_layouts
    if lays is None:
        return
    w = layer._parameters.get("weight")
    if w is None:
        return
    _plan(layer, w.device, w.dtype)


def cache_weights(model: torch.nn.Module, enabled: bool = True) -> int:
    """Keep (or drop) a dequantized copy of every packed weight that has no fused low-bit kernel, in the compute
    dtype: the ``weight_cache`` path, bit-identical to the reference and as fast as the float model, at the memory
    cost of that copy. Off by default. Returns the bytes the caches hold after the first call per layer is made
    (0 right after turning it on; see :func:`cached_bytes`)."""
    for mod in model.modules():
        if getattr(mod, "weight_layouts", None) is not None and isinstance(mod, torch.nn.Linear):
            plans = _plans(mod)
            plans.cache_weights = enabled
            plans.by_key.clear()
    return cached_bytes(model)


def prepack_weights(model: torch.nn.Module, enabled: bool = True) -> int:
    """Keep (or drop) a second copy of every packed Linear and Conv2d weight in the layout of its fastest CPU kernel:
    oneDNN's blocked int8 for INT weights x static INT activations (W8A8, W4A8, Linear and convolutions: the
    ``onednn_int8`` path; a convolution has no zero-copy integer path, so without it it runs the fake-quant
    convolution), int4pack for group-wise INT4 weights (W4A16, below ``kernels_cpu.INT4_MAX_ROWS`` input rows:
    ``int4_weight``). Off by default: measured on DiT-XL/2 blocks, the copies cost 0.30x the BF16 model for W8A8
    and W4A16 and 0.42x for W4A8, whose 4-bit codes are held as INT8 (docs/memory.md), and the zero-copy paths
    (``torch._int_mm`` on the stored codes, the tiled dequantization) compute the same integer sums / the same
    products. Returns :func:`kernel_bytes` once every layer's state is built."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for mod in model.modules():
        if getattr(mod, "weight_layouts", None) is not None and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            plans = _plans(mod)
            with plans.lock:
                plans.prepack = enabled
                plans.by_key = {}
            prepare(mod)
    return kernel_bytes(model)


def kernel_bytes(model: torch.nn.Module) -> int:
    """Bytes of kernel state the model's packed layers and quantizers hold right now beside their parameters and
    buffers: prepacked weights, dequantized caches, activation code tables, the static quantizers' fake-quant
    tables, row sums and scales (views of the layer's own tensors are not counted)."""
    total = 0
    for mod in model.modules():
        tables = mod.__dict__.get("_dmq_bin_tables")  # a static quantizer's lookup table (dmq.quantizer)
        if tables:
            total += _tensor_bytes([hit[2] for hit in tables.values()], set())
        plans = mod.__dict__.get("_dmq_kernel_plans")
        if not plans:
            continue
        own = {t.untyped_storage().data_ptr() for t in _layer_tensors(mod)}
        for plan in plans.by_key.values():
            total += _tensor_bytes(vars(plan), own)
    return total


def _layer_tensors(mod: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
        out += list(t.tensors().values()) if hasattr(t, "tensors") else [t]
    return [t for t in out if not t.is_mkldnn]


def _tensor_bytes(obj: object, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if obj.is_mkldnn:  # opaque storage: its element count is its size
            return obj.numel() * obj.element_size()
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, _Plan):  # a convolution's per-part plans
        return _tensor_bytes(vars(obj), seen)
    return 0


def cached_bytes(model: torch.nn.Module) -> int:
    """Bytes held by :func:`cache_weights` copies right now."""
    total = 0
    for mod in model.modules():
        plans = mod.__dict__.get("_dmq_kernel_plans")
        for plan in (plans.by_key.values() if plans else ()):
            if plan.cache is not None:
                total += plan.cache.numel() * plan.cache.element_size()
    return total


def frozen_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``Q_a(x) Q_w(W)^T + b`` of a packed Linear (``x`` after its input transform; the low-rank branch is the
    layer's), on the first execution path that applies (see the module docstring)."""
    q = layer.input_quantizer
    ready = q is not None and q.enabled and q.frozen
    if torch.compiler.is_compiling():  # no Python-side state under tracing: the traceable integer path
        return _traceable(layer, x, q, ready)
    if torch.is_grad_enabled() and x.requires_grad:
        # the integer and int4pack kernels have no derivative: a gradient (LoRA training through the frozen base)
        # takes the reference, whose fake quantizer passes it straight through
        return _reference(layer, x, q)
    plan = _plan(layer, x.device, x.dtype)
    if plan.int_act and ready:
        y = _int_path(layer, plan, q, x)
        if y is not None:
            return y
    elif layer.exec_path == "fp8_gemm" and ready and x.is_cuda:
        scale, _ = q.static_params(x)
        part = layer._part(0)
        w_scale = part["weight_scale"].to(torch.float32).reshape(-1).expand(layer.weight_layouts[0].rows)
        y = fp8_linear(x, scale, part["qweight"], w_scale, layer.bias)
        if y is not None:
            return y
    if (ready and plan.rows is not None and plan.cache is None and plan.int4 is None and x.device.type == "cpu"
            and enabled("tiled_dequant")):
        gemm = kernels_cpu.tile_gemm_dtype(x.dtype)
        # a static input quantizer straight into the float32 GEMM's operand: one lookup, no cast after it
        xg = q.lookup_as(x, gemm) if gemm != x.dtype else None
        if xg is not None:
            y = kernels_cpu.tiled_linear(xg.reshape(-1, plan.k), plan.n, _rows_in(plan.rows, x.dtype, gemm),
                                         layer.bias, gemm_dtype=gemm, x_gemm=xg.reshape(-1, plan.k), dtype=x.dtype,
                                         rounded=True, gemv=_gemv(plan.rows, x.dtype))
            return y.reshape(*x.shape[:-1], plan.n)
    xq = q(x) if q is not None else x
    if plan.cache is not None and enabled("weight_cache"):
        return F.linear(xq, plan.cache, layer.bias)
    lays = layer.weight_layouts
    if (plan.int4 is not None and enabled("int4_weight") and xq.dtype == plan.int4[1].dtype
            and xq.numel() < kernels_cpu.INT4_MAX_ROWS * plan.k):
        packed, sz, g = plan.int4
        y = kernels_cpu.int4_weight_linear(xq.reshape(-1, plan.k), packed, sz, g, layer.bias)
        return y.reshape(*x.shape[:-1], plan.n)
    if len(lays) == 1 and enabled("tiled_dequant"):
        gemm = kernels_cpu.tile_gemm_dtype(xq.dtype) if xq.device.type == "cpu" else None
        if plan.rows is not None:
            rows = _rows_in(plan.rows, xq.dtype, gemm or xq.dtype)
        else:
            part, lay = layer._part(0), lays[0]

            def rows(r0: int, r1: int) -> torch.Tensor:
                return _dequant_rows(part, lay, r0, r1)[:, : lay.cols].to(xq.dtype).to(gemm or xq.dtype)

        xg = None
        if gemm is not None and gemm != xq.dtype:  # Q, K and V projections share one input and its cast
            xg = _CAST.get(xq, (gemm, plan.k), lambda t: t.reshape(-1, plan.k).to(gemm))
        gemv = _gemv(plan.rows, xq.dtype) if plan.rows is not None else None
        y = kernels_cpu.tiled_linear(xq.reshape(-1, plan.k), plan.n, rows, layer.bias, gemm_dtype=gemm, x_gemm=xg,
                                     rounded=True, gemv=gemv)
        return y.reshape(*x.shape[:-1], plan.n)
    return F.linear(xq, layer.dequantized_weight(x.dtype), layer.bias)


def _rows_in(rows, dtype: torch.dtype, gemm: torch.dtype):
    """The tiled path's weight tiles, rounded to the compute dtype and held in the GEMM's (see
    :meth:`dmq.packed.RowDequantizer.rows_in`)."""
    return lambda r0, r1: rows.rows_in(r0, r1, dtype, gemm)


def _gemv(rows, dtype: torch.dtype):
    """The tiled path's product for a few input rows without tiles (see :meth:`dmq.packed.RowDequantizer.gemv`)."""
    return lambda x, bias: rows.gemv(x, bias, dtype)


def int_act_ok(lay, q) -> bool:
    """Whether a weight part of layout ``lay`` read through quantizer ``q`` has an integer GEMM: signed INT weights
    per output channel (or tensor) and a static per-tensor INT input quantizer of at most 8 bits."""
    if q is None or q.spec.dynamic or q.spec.granularity != "tensor":
        return False
    wf, af = lay.fmt, q.fmt
    return (isinstance(wf, formats.IntFormat) and wf.signed and lay.granularity in ("channel", "tensor")
            and isinstance(af, formats.IntFormat) and af.bits <= 8)


def int_conv_ok(layer) -> bool:
    """A packed ``Conv2d`` that oneDNN's int8 convolution computes exactly: every part (two for a shortcut split)
    with an integer GEMM (:func:`int_act_ok`) and unpadded rows, zero padding given as numbers."""
    lays = layer.weight_layouts or ()
    qs = _conv_quantizers(layer)
    if len(lays) != len(qs) or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    return all(int_act_ok(lay, q) and lay.padded_cols == lay.cols for lay, q in zip(lays, qs))


def _conv_quantizers(layer) -> list:
    """The input quantizer of each weight part: one, or two for a shortcut split (``x[:, :s]``, ``x[:, s:]``)."""
    if layer.split is None:
        return [layer.input_quantizer]
    return [layer.input_quantizer, layer.input_quantizer_skip]


def frozen_conv(layer, x: torch.Tensor) -> torch.Tensor:
    """``conv(Q_a(x), Q_w(W)) + b`` of a packed ``Conv2d`` (the low-rank and LoRA branches are the layer's): on
    oneDNN's u8 x s8 convolution for static INT activations with one timestep bin per call (path ``onednn_int8``;
    the bound of the integer Linear path), otherwise the fake-quantized input and the weight dequantized on the fly,
    bit for bit the fake-quant convolution."""
    q = layer.input_quantizer
    plan = None if torch.compiler.is_compiling() else _plan(layer, x.device, x.dtype)  # once per call
    if (plan is not None and plan.parts and x.device.type == "cpu" and x.dtype.itemsize == 2 and q is not None
            and q.enabled and q.frozen and enabled("onednn_int8")
            and not (torch.is_grad_enabled() and x.requires_grad)):
        parts = plan.parts
        bins = [qi.single_bin(x.shape[0]) if qi.enabled and qi.frozen else None for qi in _conv_quantizers(layer)]
        if None not in bins:
            xs = [x] if len(parts) == 1 else [x[:, : layer.split], x[:, layer.split :]]
            if len(parts) == 1:
                return _int_conv(parts[0], bins[0], xs[0], layer.bias, x.dtype)
            # a shortcut split: the two halves' convolutions in float32, summed, rounded once
            y = _int_conv(parts[0], bins[0], xs[0], None, torch.float32)
            return y.add_(_int_conv(parts[1], bins[1], xs[1], layer.bias, torch.float32)).to(x.dtype)
    xq = _split_lookup(layer, plan, x) if plan is not None and layer.split is not None else None
    xq = layer._quant_input(x) if xq is None else xq
    return layer._conv_forward(xq, _conv_weight(layer, plan, x), layer.bias)


def _split_lookup(layer, plan: _Plan, x: torch.Tensor) -> torch.Tensor | None:
    """A shortcut split's input through both static quantizers' tables in one lookup (the skip half's bit patterns
    offset into the second table, path ``static_table``): bit for bit the two halves' lookups and their
    concatenation, without the half-size copies. None where either table does not apply."""
    qa, qb = layer.input_quantizer, layer.input_quantizer_skip
    if qa is None or qb is None or not x.is_contiguous():
        return None
    ta = qa.static_table(x)
    tb = qb.static_table(x) if ta is not None else None
    if tb is None:
        return None
    key = plan.split_key
    if enabled("native16"):
        out = native.gather16_split(ta, tb, x, layer.split)
        if out is not None:
            return out
    if key is None or key.a is not ta or key.b is not tb:  # the bins' tables change as a sampler walks them
        plan.split_key, plan.split_table = _Pair(ta, tb), torch.cat([ta, tb])
    idx = x.view(torch.uint16).to(torch.int32)
    idx[:, layer.split :] += 1 << 16
    return plan.split_table.index_select(0, idx.reshape(-1)).reshape(x.shape)


class _Pair:
    """The two tables a joint split table was built from (held, so that identity means the same tables; not
    counted by :func:`kernel_bytes`, which counts them with their quantizers)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b


def _conv_weight(layer, plan: _Plan | None, x: torch.Tensor) -> torch.Tensor:
    """``layer.dequantized_weight(x.dtype)`` bit for bit: through the row dequantizers of the eager ``plan`` (path
    ``tiled_dequant``; about a third of the small operations of the general unpacking) where they cover the layout."""
    if plan is not None and enabled("tiled_dequant"):
        rows = plan.conv_rows
        if rows:
            ws = [r.rows_in(0, r.layout.rows, x.dtype, x.dtype).reshape(r.layout.shape) for r in rows]
            return ws[0] if len(ws) == 1 else torch.cat(ws, dim=1)
    return layer.dequantized_weight(x.dtype)


def _int_conv(plan: _Plan, b: int, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
              ) -> torch.Tensor:
    u8 = _table_codes(plan, b, x)
    return kernels_cpu.onednn_int8_conv(u8, plan.s_f[b], plan.z_i[b] + plan.off, plan.onednn, plan.w_scale, bias,
                                        plan.conv, out_dtype)


def _int_path(layer, plan: _Plan, q, x: torch.Tensor) -> torch.Tensor | None:
    b = q.single_bin(x.shape[0])
    if b is not None and plan.onednn is not None and enabled("onednn_int8"):
        x2d = x.reshape(-1, plan.k)
        if x.dtype.itemsize == 2:
            u8 = _table_codes(plan, b, x2d)
        else:
            u8 = act_codes(x2d, plan.s_t[b], plan.z_t[b], plan.qmin, plan.qmax).add_(plan.off).to(torch.uint8)
        y = kernels_cpu.onednn_int8_linear(u8, plan.s_f[b], plan.z_i[b] + plan.off, plan.onednn, plan.w_scale,
                                           layer.bias, x.dtype)
        return y.reshape(*x.shape[:-1], plan.n)
    if not enabled("int_gemm"):
        return None
    a_codes = None
    if b is not None:
        scale, zp = plan.s_t[b], plan.z_t[b]
        if x.dtype.itemsize == 2 and x.device.type == "cpu" and enabled("static_table"):
            # one lookup instead of the quantizer's five passes: the unsigned code (plus plan.off) - 128 is the
            # code minus c = 128 - plan.off, in int8
            a_codes = (_table_codes(plan, b, x.reshape(-1, plan.k), signed=True), 128 - plan.off)
    else:
        scale, zp = q.static_params(x)
    codes = plan.codes if plan.codes is not None else int_codes(layer._part(0), layer.weight_layouts[0])
    epilogue = None
    if b is not None:  # the bin's epilogue constants, built once (a sampler walks the bins in order)
        off = a_codes[1] if a_codes is not None else _code_offset(plan.a_bits, plan.a_signed)
        hit = plan.epilogue
        if hit is None or hit[0] != (b, x.dtype, off):
            hit = plan.epilogue = ((b, x.dtype, off), _epilogue(scale, zp, off, x.dtype, plan.w_scale, plan.rowsum))
        epilogue = hit[1]
    return int_linear(x, scale, zp, plan.a_bits, plan.a_signed, codes, plan.w_scale, plan.rowsum, layer.bias,
                      a_codes, epilogue)


def _table_codes(plan: _Plan, b: int, x: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """The uint8 activation codes of the 16-bit ``x`` for bin ``b``: one lookup per element in :func:`_code_table`
    (``signed``: those codes minus 128, as int8, for ``torch._int_mm``)."""
    return gather16(_code_table(plan, b, signed), x.view(torch.int16).reshape(-1), 32768).reshape(x.shape)


def _code_table(plan: _Plan, b: int, signed: bool = False) -> torch.Tensor:
    """The uint8 activation code (plus the signed offset) of every one of the 65536 bfloat16 / float16 values, for
    timestep bin ``b`` (``signed``: minus 128, as int8): :func:`act_codes` itself applied to every bit pattern, so a
    lookup is bit-identical to the fake quantizer's codes and replaces its five elementwise passes (NaN, which has no
    code, maps to the zero point). 64 KiB, built on first use of the bin; one is kept per kind, for the last bin
    used (a sampler walks the bins in order)."""
    tables = plan.__dict__.setdefault("tables", {})
    hit = tables.get(signed)
    if hit is None or hit[0] != b:
        dtype = plan.s_t[b].dtype
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
        codes = act_codes(every, plan.s_t[b], plan.z_t[b], plan.qmin, plan.qmax)
        codes = torch.where(codes.isnan(), float(plan.z_i[b] - plan.off), codes).add_(plan.off).reshape(-1)
        hit = tables[signed] = (b, codes.sub_(128).to(torch.int8) if signed else codes.to(torch.uint8))
    return hit[1]


def _traceable(layer, x: torch.Tensor, q, ready: bool) -> torch.Tensor:
    if layer.exec_path == "int_gemm" and ready and enabled("int_gemm"):
        scale, zp = q.static_params(x)
        lay = layer.weight_layouts[0]
        part = layer._part(0)
        codes = int_codes(part, lay)
        w_scale = part["weight_scale"].to(torch.float32).reshape(-1).expand(lay.rows)
        # the row sums in the graph (one pass over the codes), not a buffer beside them: 4 bytes a row, 1.7% of the
        # bundled DiT at W8A8 (the eager plan keeps its own, counted by kernel_bytes)
        rowsum = codes.to(torch.int32).sum(1, dtype=torch.int32)
        return int_linear(x, scale, zp, q.fmt.bits, q.fmt.signed, codes, w_scale, rowsum, layer.bias)
    return _reference(layer, x, q)


def _reference(layer, x: torch.Tensor, q) -> torch.Tensor:
    xq = q(x) if q is not None else x
    return F.linear(xq, layer.dequantized_weight(x.dtype), layer.bias)
