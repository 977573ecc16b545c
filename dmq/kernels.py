"""Real low-bit GEMMs of frozen layers: integer matmul with fused scales (CPU and CUDA), FP8 scaled matmul (CUDA).

INT activations x INT weights (Jacob et al. 2018, eq. 7): with activation codes ``q_a`` (scale ``s_a``, zero point
``z``) and weight codes ``q_w`` (per-output-channel scale ``s_w``, symmetric),

    y[m, n] = s_a s_w[n] * sum_k (q_a[m, k] - z) q_w[n, k] + b[n]
            = s_a s_w[n] * ( (q_a - c) @ q_w^T [m, n]  +  (c - z) * rowsum(q_w)[n] ) + b[n].

The offset ``c = 2^(bits-1)`` maps unsigned codes into int8, so the GEMM runs on ``torch._int_mm`` (int8 x int8 ->
int32, exact), and the zero point folds into one integer term per output channel: the sum is exact in integers, and
the only roundings are the final float32 conversion, the scale product and the bias.

``disable("int_gemm")`` / ``disable("fp8_gemm")`` turn a path off (the layers then dequantize their weight and run
the float matmul of the fake-quant path, bit for bit).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

PATHS = ("int_gemm", "fp8_gemm")
_DISABLED: set[str] = set()
_WARNED: set[str] = set()


@contextlib.contextmanager
def disable(*paths: str):
    """Run the enclosed code with the named execution paths off (``"int_gemm"``, ``"fp8_gemm"``)."""
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


# output rows per chunk of the integer GEMM: the int32 accumulator and its float epilogue stay in cache
INT_ROWS = 256


def int_linear(x: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor | None, a_bits: int, a_signed: bool,
               w_codes: torch.Tensor, w_scale: torch.Tensor, w_rowsum: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """``y = Q_a(x) Q_w(W)^T + b`` through an integer GEMM.

    Args:
        x: ``(B, ..., K)`` float input.
        a_scale, a_zp: the activation quantizer's scale and zero point, shaped ``(B or 1, 1, ..., 1)``.
        a_bits, a_signed: the activation INT grid (unsigned codes are offset by ``2^(bits-1)``).
        w_codes: int8 ``(N, K)`` weight codes; ``w_scale``: float32 ``(N,)``; ``w_rowsum``: int32 ``(N,)``.

    Per row: ``acc = int_mm(q_a - c, q_w)`` (exact int32), ``acc += (c - z) * rowsum`` (exact), then
    ``y = float32(acc) * (s_a * s_w) + b``, rounded once to ``x``'s dtype. Rows go in chunks of ``INT_ROWS``.
    """
    k, n = x.shape[-1], w_codes.shape[0]
    lead = x.shape[:-1]
    qmin, qmax = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if a_signed else (0, 2**a_bits - 1)
    off = 0 if a_signed else 2 ** (a_bits - 1)
    q = act_codes(x, a_scale, a_zp, qmin, qmax)
    a = q.sub_(off).to(torch.int8).reshape(-1, k)
    m = a.shape[0]
    z = torch.zeros_like(a_scale) if a_zp is None else a_zp.reshape(a_scale.shape)
    # per-row activation scale and zero-point offset (one value per sample, repeated over its tokens)
    per_sample = a_scale.numel() > 1
    rows_per_sample = m // a_scale.shape[0]
    s_rows = a_scale.to(torch.float32).reshape(-1, 1).repeat_interleave(rows_per_sample, 0)
    c_rows = (off - z.to(torch.int32)).reshape(-1, 1).repeat_interleave(rows_per_sample, 0)
    if not per_sample:
        sw = s_rows[:1] * w_scale  # (1, N)
        corr = c_rows[:1] * w_rowsum
    b = None if bias is None else bias.detach().to(torch.float32)  # inference kernel: no autograd graph
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for r0 in range(0, m, INT_ROWS):
        r1 = min(m, r0 + INT_ROWS)
        acc = int_mm(a[r0:r1], w_codes)
        if per_sample:
            sw = s_rows[r0:r1] * w_scale
            corr = c_rows[r0:r1] * w_rowsum
        if off or a_zp is not None:
            acc.add_(corr)
        f = acc.to(torch.float32)
        if b is None:
            f.mul_(sw)
        else:
            torch.addcmul(b, f, sw, out=f)
        out[r0:r1] = f
    return out.reshape(*lead, n)


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
