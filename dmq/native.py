"""The fused CPU loops of ``native16.c``, compiled on first use and called through ``ctypes`` (path ``native16``).

The eager fast paths of :mod:`dmq.formats.grid` (a table lookup per 16-bit pattern, NVFP4 / MX / per-token
rounding, block maxima) spend several whole-tensor PyTorch passes per quantization: about 4 ns an element on this
CPU, more than the BF16 convolutions of a small U-Net. Each C function does one of them in one pass, with the same
roundings in the same order (bit for bit; ``tests/dmq/test_native.py``). The weight tiles of the tiled GEMM are here
too, the product of a few input rows with a packed weight, which sums in its own order (the tiled path's bound), and
the epilogue of the integer GEMM. Each loop splits its rows over ``torch.get_num_threads()`` threads, on the OpenMP
team PyTorch's own loops use (POSIX threads where the compiler has no OpenMP); no result depends on the split.

The library is built with the system C compiler (``$CC``, else ``cc``) into ``$DMQ_CACHE_DIR`` (default
``~/.cache/dmq``), under a name that hashes the source, the flags and the CPU's feature list, so a changed source or
another CPU builds anew. No compiler, a failed build or ``DMQ_NATIVE=0`` leaves :func:`library` ``None``, and the
callers keep their PyTorch form. ``dmq.kernels.disable("native16")`` turns the path off for a block of code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native16.c")
# -ffp-contract=off: no fused multiply-add, so every float32 operation rounds once, as PyTorch's passes do
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c99")
# the loops' threads: OpenMP's team (PyTorch's own on Linux), else POSIX threads where the compiler has no OpenMP
THREAD_FLAGS = (("-fopenmp",), ("-pthread",))
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": the loaded library or None once tried

_P, _I64, _U32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
_F, _I32 = ctypes.c_float, ctypes.c_int32
# name -> (argument types, result type): the rounding loops and the few-row product return a status (1: not done);
# every function's last argument is the thread count
_SIGNATURES = {
    "dmq_gather16_1": ((_P, _P, _P, _I64, _U32, _INT), None),
    "dmq_gather16_2": ((_P, _P, _P, _I64, _U32, _INT), None),
    "dmq_gather16_4": ((_P, _P, _P, _I64, _U32, _INT), None),
    "dmq_absmax16": ((_P, _P, _I64, _I64, _INT), None),
    "dmq_round_div_bf16": ((_P, _P, _P, _I64, _I64, _INT, _F, _F, _I32, _I32, _INT), _INT),
    "dmq_round_scaled_bf16": ((_P, _P, _P, _I64, _I64, _F, _F, _I32, _I32, _INT), _INT),
    "dmq_dequant_rows": ((_P, _I64, _P, _INT, _P, _I64, _I64, _P, _I64, _I64, _INT, _INT), None),
    "dmq_gather16_split_2": ((_P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT), None),
    "dmq_unpack_s4": ((_P, _P, _I64, _I64, _I64, _INT), None),
    "dmq_dequant_gemv": ((_P, _I64, _I64, _P, _I64, _P, _INT, _P, _I64, _I64, _P, _P, _I64, _INT, _INT), _INT),
    "dmq_int_epilogue": ((_P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _INT, _INT), None),
}
# dmq_quant_blocks_bf16 returns a status; its modes, in native16.c's order
NVFP4, MX, TOKEN = 0, 1, 2


class _Grid(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_float), ("hi", ctypes.c_float), ("s_min", ctypes.c_int32), ("s_add", ctypes.c_int32)]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (pytest-xdist workers) never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for i, threads in enumerate(THREAD_FLAGS):
            try:
                subprocess.run([compiler, *FLAGS, *threads, str(SOURCE), "-o", tmp], check=True, capture_output=True,
                               timeout=120)
                break
            except subprocess.CalledProcessError:
                if i == len(THREAD_FLAGS) - 1:
                    raise
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DMQ_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("dmq.native: no C compiler found; the native16 path is off")
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((FLAGS, THREAD_FLAGS, compiler, platform.machine(), _cpu_features())).encode()
    ).hexdigest()[:16]
    try:
        cache = Path(os.environ.get("DMQ_CACHE_DIR") or Path.home() / ".cache" / "dmq")
    except RuntimeError:  # no home directory to cache in
        logger.info("dmq.native: no cache directory (set DMQ_CACHE_DIR); the native16 path is off")
        return None
    target = cache / f"native16-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.warning("dmq.native: building %s failed (%s %s); the native16 path is off", SOURCE.name, e,
                       detail.decode(errors="replace")[:500])
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    grid = ctypes.POINTER(_Grid)
    lib.dmq_quant_blocks_bf16.argtypes = (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _F, grid, grid, _F, _INT,
                                          _INT)
    lib.dmq_quant_blocks_bf16.restype = _INT
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built (built once per process, on first use)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


def usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library when every tensor is a contiguous CPU tensor outside a trace and outside autograd; else None
    (the caller keeps its PyTorch form; the callers in :mod:`dmq.formats.grid` check ``"native16"`` themselves)."""
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or (t.requires_grad and torch.is_grad_enabled()):
            return None
    return library()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    """The loops' thread count: PyTorch's intra-op one, so that ``torch.set_num_threads`` governs them too."""
    return torch.get_num_threads()


def gather16(table: torch.Tensor, bits: torch.Tensor, flip: int) -> torch.Tensor | None:
    """``table[bits ^ flip]`` for flat 16-bit ``bits`` and a 65536-entry table of 1-, 2- or 4-byte entries; None
    where the path does not apply."""
    lib = usable(table, bits)
    size = table.element_size()
    if lib is None or bits.element_size() != 2 or size not in (1, 2, 4) or table.numel() != 1 << 16:
        return None
    out = torch.empty(bits.shape, dtype=table.dtype)
    fn = {1: lib.dmq_gather16_1, 2: lib.dmq_gather16_2, 4: lib.dmq_gather16_4}[size]
    fn(_ptr(table), _ptr(bits), _ptr(out), bits.numel(), flip, _threads())
    return out


def absmax16(x: torch.Tensor) -> torch.Tensor | None:
    """Per row of the last dimension, the 16-bit pattern of ``max |x|`` (``x``'s dtype, shape ``(..., 1)``)."""
    lib = usable(x)
    if lib is None or x.element_size() != 2 or x.dim() == 0 or x.shape[-1] == 0:
        return None
    out = torch.empty((*x.shape[:-1], 1), dtype=x.dtype)
    lib.dmq_absmax16(_ptr(x), _ptr(out), out.numel(), x.shape[-1], _threads())
    return out


def _grid_args(spec) -> tuple[float, float, int, int] | None:
    """``(lo, hi, s_min, s_add)`` of :func:`round_grid` in ``native16.c`` for a ``GridSpec``, or None for a grid the
    C kernel does not take (a scale other than 1, or constants outside float32's exponent range)."""
    if spec.scale != 1.0 or not 0 <= spec.man_bits <= 23 or not 1 <= spec.emin + 127 <= 254:
        return None
    top = max(spec.emin, math.frexp(max(abs(spec.lo), abs(spec.hi)))[1] - 1)
    if top + 23 - spec.man_bits > 127:
        return None
    return float(spec.lo), float(spec.hi), (spec.emin + 127) << 23, (23 - spec.man_bits) << 23


def round_div_bf16(x: torch.Tensor, scale: torch.Tensor, spec, pow2: bool) -> torch.Tensor | None:
    """``bf16(bf16(grid(bf16(x / s))) * s)`` for bfloat16 rows ``x`` ``(R, k)`` and bfloat16 scales ``(R, 1)`` (the
    quotient as ``x * bf16(1 / s)`` when ``pow2``); None where the path does not apply or a value or scale is not
    finite (the eager path keeps torch's NaN patterns)."""
    lib = usable(x, scale)
    args = _grid_args(spec)
    if lib is None or args is None or x.dtype != torch.bfloat16 or scale.dtype != torch.bfloat16:
        return None
    out = torch.empty_like(x)
    bad = lib.dmq_round_div_bf16(_ptr(x), _ptr(scale), _ptr(out), scale.numel(), x.shape[-1], int(pow2), *args,
                                 _threads())
    return None if bad else out


def round_scaled_bf16(x: torch.Tensor, denom: torch.Tensor, spec) -> torch.Tensor | None:
    """``bf16(grid(float32(x) / d) * d)`` for bfloat16 rows ``x`` ``(R, k)`` and float32 ``d`` ``(R, 1)``; None where
    the path does not apply or a value is not finite or a denominator not finite and nonzero."""
    lib = usable(x, denom)
    args = _grid_args(spec)
    if lib is None or args is None or x.dtype != torch.bfloat16 or denom.dtype != torch.float32:
        return None
    out = torch.empty_like(x)
    bad = lib.dmq_round_scaled_bf16(_ptr(x), _ptr(denom), _ptr(out), denom.numel(), x.shape[-1], *args, _threads())
    return None if bad else out


def quant_blocks_bf16(x: torch.Tensor, dim: int, block: int, mode: int, elem_spec, elem_max: float,
                      scale_spec=None, scale_min: float = 0.0, emax: int = 0) -> torch.Tensor | None:
    """Dynamic fake quantization of a dense bfloat16 ``x`` in blocks of ``block`` along ``dim`` (``block`` = the
    whole dimension: one scale per position of the others), in ``mode`` (:data:`NVFP4`, :data:`MX` or
    :data:`TOKEN`; ``dmq_quant_blocks_bf16`` in ``native16.c`` gives each one's formula). A contiguous result of
    ``x``'s shape, or None where the path does not apply or a value is not finite (the caller's eager path then
    handles it)."""
    lib = usable(x)
    g = _grid_args(elem_spec)
    sg = (0.0, 0.0, 0, 0) if scale_spec is None else _grid_args(scale_spec)
    if lib is None or g is None or sg is None or x.dtype != torch.bfloat16 or x.numel() == 0:
        return None
    c = x.shape[dim]
    if block <= 0 or c % block:
        return None
    outer, inner = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])
    nb = x.numel() // block
    amax = torch.empty(nb, dtype=torch.int16)
    sa = torch.empty(nb, dtype=torch.float32)
    sb = torch.empty(nb, dtype=torch.float32)
    out = torch.empty_like(x)
    status = lib.dmq_quant_blocks_bf16(
        _ptr(x), _ptr(out), _ptr(amax), _ptr(sa), _ptr(sb), outer, c, inner, block, mode, elem_max,
        ctypes.byref(_Grid(*g)), ctypes.byref(_Grid(*sg)), scale_min, emax, _threads())
    return out if status == 0 else None


# dmq_dequant_rows' output kinds: float32, float32 rounded to bfloat16, bfloat16
_DEQUANT_KINDS = {(torch.float32, torch.float32): 0, (torch.bfloat16, torch.float32): 1,
                  (torch.bfloat16, torch.bfloat16): 2}


def _codes_per_byte(codes: torch.Tensor, table: torch.Tensor | None) -> int | None:
    """``dmq_dequant_rows``' ``vpb``: 1 or 2 codes a byte read through ``table``, or (``table`` None) 0 / -1 for
    int8 / uint8 codes that are their own values; None for anything else."""
    if table is None:
        return {torch.int8: 0, torch.uint8: -1}.get(codes.dtype)
    if codes.dtype != torch.uint8 or table.dtype != torch.float32 or table.shape[0] != 256 or table.dim() > 2:
        return None
    vpb = 1 if table.dim() == 1 else table.shape[1]
    return vpb if vpb in (1, 2) else None


def dequant_rows(codes: torch.Tensor, table: torch.Tensor | None, scales: torch.Tensor, group: int, cols: int,
                 dtype: torch.dtype, gemm_dtype: torch.dtype) -> torch.Tensor | None:
    """Rows of a packed weight: ``codes`` ``(n, bytes)`` uint8, ``table`` the float32 values of a byte's codes
    ``(256,)`` or ``(256, 2)`` (low nibble first), or None for int8 / uint8 ``codes`` that are their own values;
    ``scales`` float32 ``(n, groups)``; each value times its group's scale, rounded to ``dtype`` and held in
    ``gemm_dtype``: ``(n, cols)``. None where the path does not apply."""
    lib = usable(codes, scales) if table is None else usable(codes, table, scales)
    kind = _DEQUANT_KINDS.get((dtype, gemm_dtype))
    vpb = _codes_per_byte(codes, table)
    n = codes.shape[0]
    if (lib is None or kind is None or vpb is None or scales.dtype != torch.float32 or scales.dim() != 2
            or scales.shape[0] != n or group <= 0 or scales.shape[1] * group < cols
            or codes.shape[1] * max(vpb, 1) < cols):
        return None
    out = torch.empty(n, cols, dtype=gemm_dtype)
    lib.dmq_dequant_rows(_ptr(codes), codes.shape[1], None if table is None else _ptr(table), vpb, _ptr(scales),
                         scales.shape[1], group, _ptr(out), n, cols, kind, _threads())
    return out


def gather16_split(ta: torch.Tensor, tb: torch.Tensor, x: torch.Tensor, split: int) -> torch.Tensor | None:
    """``x`` (16-bit, dense, channels on dim 1) looked up in ``ta`` below channel ``split`` and in ``tb`` from it on
    (65536-entry tables of 2-byte entries): a contiguous result of ``x``'s shape and the tables' dtype."""
    lib = usable(ta, tb, x)
    if (lib is None or x.dim() < 2 or x.element_size() != 2 or ta.element_size() != 2 or ta.dtype != tb.dtype
            or ta.numel() != 1 << 16 or tb.numel() != 1 << 16):
        return None
    out = torch.empty(x.shape, dtype=ta.dtype)
    lib.dmq_gather16_split_2(_ptr(ta), _ptr(tb), _ptr(x), _ptr(out), x.shape[0], x.shape[1],
                             math.prod(x.shape[2:]), split, _threads())
    return out


def unpack_s4(q: torch.Tensor, cols: int) -> torch.Tensor | None:
    """Signed 4-bit codes stored two a byte (low nibble first) in ``q`` ``(R, bytes)``, as int8 ``(R, cols)``."""
    lib = usable(q)
    if lib is None or q.dtype != torch.uint8 or q.dim() != 2 or not 0 < cols <= 2 * q.shape[1]:
        return None
    out = torch.empty(q.shape[0], cols, dtype=torch.int8)
    lib.dmq_unpack_s4(_ptr(q), _ptr(out), q.shape[0], q.shape[1], cols, _threads())
    return out


GEMV_MAX_ROWS = 8  # dmq_dequant_gemv's limit: input rows multiplied by each weight row while it is in L1
GEMV_MAX_K = 16384


def dequant_gemv(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, group: int,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x W^T + bias`` in float32 for float32 ``x`` ``(m, k)`` (``m <= GEMV_MAX_ROWS``), ``W`` the rows of
    :func:`dequant_rows` (``codes``, ``table`` or None, ``scales``, ``group``) rounded to ``dtype``; no tile is
    built. None where the path does not apply."""
    lib = usable(*(t for t in (x, codes, table, scales, bias) if t is not None))
    kind = _DEQUANT_KINDS.get((dtype, torch.float32))
    vpb = _codes_per_byte(codes, table)
    n = codes.shape[0]
    if (lib is None or kind is None or vpb is None or x.dtype != torch.float32 or x.dim() != 2
            or not 0 < x.shape[0] <= GEMV_MAX_ROWS or x.shape[1] > GEMV_MAX_K or scales.dtype != torch.float32
            or scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] * group < x.shape[1]
            or codes.shape[1] * max(vpb, 1) < x.shape[1]
            or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != n))):
        return None
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    table_ptr = None if table is None else _ptr(table)
    bad = lib.dmq_dequant_gemv(_ptr(x), x.shape[0], x.shape[1], _ptr(codes), codes.shape[1], table_ptr, vpb,
                               _ptr(scales), scales.shape[1], group, None if bias is None else _ptr(bias), _ptr(y),
                               n, kind, _threads())
    return None if bad else y


_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # dmq_int_epilogue's output kinds


def int_epilogue(acc: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None, w_scale: torch.Tensor,
                 rowsum: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> bool:
    """The epilogue of :func:`dmq.kernels.int_linear` on one chunk, written into ``out`` ``(m, n)`` (bfloat16 or
    float32): ``round(float32(acc + c * rowsum) * (s * w_scale) + bias)`` for the int32 GEMM result ``acc``
    ``(m, n)``, float32 ``s`` and int32 ``c`` with one value per row or one for all (``c`` None: no correction),
    float32 ``w_scale`` and ``bias`` and int32 ``rowsum`` of ``n`` values. False (``out`` untouched) where the path
    does not apply."""
    lib = usable(*(t for t in (acc, s, c, w_scale, rowsum, bias, out) if t is not None))
    kind = _OUT_KINDS.get(out.dtype)
    if lib is None or kind is None or acc.dtype != torch.int32 or acc.dim() != 2 or out.shape != acc.shape:
        return False
    m, n = acc.shape
    if (s.dtype != torch.float32 or s.numel() not in (1, m) or w_scale.dtype != torch.float32
            or w_scale.numel() != n or rowsum.dtype != torch.int32 or rowsum.numel() != n
            or (c is not None and (c.dtype != torch.int32 or c.numel() != s.numel()))
            or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != n))):
        return False
    stride = 0 if s.numel() == 1 else 1
    lib.dmq_int_epilogue(_ptr(acc), m, n, _ptr(s), None if c is None else _ptr(c), stride, _ptr(w_scale),
                         None if c is None else _ptr(rowsum), None if bias is None else _ptr(bias), _ptr(out), kind,
                         _threads())
    return True
