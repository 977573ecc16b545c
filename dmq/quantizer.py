"""The activation tensor quantizer: a :class:`~dmq.config.QuantSpec` plus its state (observer, then frozen scales,
one set per timestep bin)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from dmq import fake_quant as fq
from dmq import native_quant
from dmq.calibration import CONTEXT, sample_timesteps, timestep_bins
from dmq.config import QuantSpec
from dmq.fake_quant import fake_quant, from_rows, params_from_range, quantize_rows_dynamic, to_rows
from dmq.formats.grid import DISABLED, lookup16
from dmq.memo import InputMemo
from dmq.observers import StreamingObserver

logger = logging.getLogger(__name__)
# a dynamic quantizer's result depends only on its input and spec: Q, K and V projections share one computation
_DYNAMIC = InputMemo()
# one memo of the running call's timestep bins: keyed by the timestep tensor object itself (held, so its id is not
# reused) and the bin layout; every quantizer of a call reads the same tensor, so the lookup runs once per call. The
# (tensor, bins) pair is replaced as a whole, so a thread never reads another call's bins.
_BIN_MEMO: list = [(None, {})]


class NotCalibratedError(RuntimeError):
    """A static activation quantizer is frozen without calibration data."""


class TensorQuantizer(nn.Module):
    """Fake-quantizes an activation tensor.

    Args:
        spec: format, granularity, symmetry, static/dynamic, estimator, timestep bins.
        channel_dim: the reduction (channel) dimension of the inputs: scales are per token along it.
        timestep_range: ``(lo, hi)`` covered by the timestep bins.

    States: *observing* (static, before :meth:`freeze`; inputs pass through unchanged while
    ``CONTEXT.calibrating``), *frozen* (static: per-bin ``scale`` / ``zero_point`` buffers), or *dynamic*
    (scales computed from every input).
    """

    follows_clock = True  # the model's timestep hook sets ``timestep_range`` to the convention calibration finds

    def __init__(self, spec: QuantSpec, channel_dim: int = -1, timestep_range: tuple[float, float] = (0.0, 1000.0)):
        super().__init__()
        self.spec, self.fmt, self.channel_dim = spec, spec.fmt, channel_dim
        for attr in ("max", "min"):  # fill the format's cached properties now: torch.compile cannot take their lock
            getattr(self.fmt, attr, None)
        self.timestep_range = timestep_range
        self.num_bins = 1 if spec.dynamic else spec.timestep_bins
        self.enabled = True
        self.observer: StreamingObserver | None = None
        if not spec.dynamic:
            self.observer = StreamingObserver(self.num_bins, histogram=spec.estimator != "minmax")
        self.register_buffer("scale", torch.ones(self.num_bins))
        self.register_buffer("zero_point", torch.zeros(self.num_bins))
        self.frozen = spec.dynamic
        self._warned: set[str] = set()

    def extra_repr(self) -> str:
        s = self.spec
        mode = "dynamic" if s.dynamic else f"static, {s.estimator}, bins={self.num_bins}"
        return f"{s.format}, {s.granularity}, {'sym' if s.symmetric else 'asym'}, {mode}"

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg)

    def current_bins(self, batch: int) -> torch.Tensor | None:
        """Bin per sample (``(batch,)``) or one bin (``(1,)``, one timestep for the batch); None for a single-bin
        quantizer or without a usable timestep. No branch on tensor values, so ``torch.compile`` traces it whole."""
        if self.num_bins == 1:
            return None
        t = CONTEXT.timestep
        if t is None:
            return None
        t = sample_timesteps(t)  # one per sample: per-token / per-frame timesteps take the noisiest
        n = t.numel()
        if n == 1 or n == batch:
            return timestep_bins(t, self.num_bins, *self.timestep_range)
        if batch % n == 0:  # (B * frames, ...) activations of video models, batch-major
            return timestep_bins(t, self.num_bins, *self.timestep_range).repeat_interleave(batch // n)
        return None

    def _observed_bins(self, batch: int) -> torch.Tensor | None:
        """:meth:`current_bins` for the observer, a batch at one timestep collapsed to one bin (calibration only:
        this reads tensor values, which eager calibration can afford)."""
        bins = self.current_bins(batch)
        if bins is not None and bins.numel() > 1 and bool((bins == bins[0]).all()):
            return bins[:1]
        return bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if CONTEXT.calibrating:
            if self.spec.dynamic:
                return x
            if CONTEXT.observe and self.observer is not None:
                self.observer.observe(x, self._observed_bins(x.shape[0]))
            return x
        if self.spec.dynamic:
            return self._dynamic(x)
        if not self.frozen:
            self._warn_once("uncal", "static activation quantizer used before dmq.calibrate/freeze: passing through")
            return x
        return self._static(x)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        dim = self.channel_dim % x.ndim

        def quantize(t: torch.Tensor) -> torch.Tensor:
            q = native_quant.dynamic(t, dim, self.fmt, s.granularity, s.symmetric)  # one pass, in t's layout
            if q is not None:
                return q
            q = quantize_rows_dynamic(to_rows(t, dim), self.fmt, s.granularity, s.group_size, s.symmetric)
            q = from_rows(q, t, dim)
            # rows along a dimension other than the last come back dim-last (channels-last for a convolution's
            # channels): a dense input gets a dense result, or the layers after it (GroupNorm above all) take
            # their slow strided paths
            return q.contiguous() if t.is_contiguous() else q

        return _DYNAMIC.get(x, (s, dim), quantize)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        one = self._one_bin(x)
        if one is not None:
            scale, zp, table = one
            if table is not None:
                return fq.fake_quant_lookup(x, self.fmt, table)
            return fake_quant(x, self.fmt, scale, zp)
        scale, zp = self.static_params(x)
        return fake_quant(x, self.fmt, scale, zp)

    def _one_bin(self, x: torch.Tensor, out_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """Eager, one timestep bin for the whole call: that bin's scale and zero point in ``x``'s dtype (kept, the
        same values) and its lookup table with results in ``out_dtype`` (None where the table path does not
        apply); None when the call has no single bin, or under tracing or a gradient on the scale."""
        if torch.compiler.is_compiling() or self.scale.requires_grad:
            return None
        b = self.single_bin(x.shape[0])
        if b is None:
            return None
        scale, zp = self._bin_params(b, x.dtype, x.device)
        return scale, zp, self._bin_table(b, x, scale, zp, out_dtype)

    def single_bin(self, batch: int) -> int | None:
        """The one timestep bin of every sample of this call (what :meth:`current_bins` gives them all), or None
        when the samples differ or no timestep applies; computed once per call and bin layout, eager only."""
        if self.num_bins == 1:
            return 0
        t = CONTEXT.timestep
        if t is None:
            return None
        memo = _BIN_MEMO[0]
        if memo[0] is not t:
            memo = (t, {})
            _BIN_MEMO[0] = memo
        key = (self.num_bins, *self.timestep_range)
        hit = memo[1].get(key)
        if hit is None:
            bins = timestep_bins(sample_timesteps(t), self.num_bins, *self.timestep_range)
            hit = memo[1][key] = (int(bins[0]) if bool((bins == bins[0]).all()) else -1, bins.numel())
        b, n = hit
        return None if b < 0 or not (n == 1 or batch % n == 0) else b  # current_bins' batch rule

    def _bin_params(self, b: int, dtype: torch.dtype, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bin ``b``'s scale and zero point as one-element tensors in ``dtype`` (what :func:`fake_quant` rounds
        them to), kept per dtype and device until the buffers change (a plain attribute, not state)."""
        def convert() -> tuple[list, list]:
            scales = [s.to(device=device, dtype=dtype).reshape(1) for s in self.scale]
            zps = [None if self.spec.symmetric else z.to(device=device, dtype=dtype).reshape(1)
                   for z in self.zero_point]
            return scales, zps

        if self.scale.is_inference() or self.zero_point.is_inference():
            # no version counter: an in-place load under inference mode would go unseen, so nothing is kept
            scales, zps = convert()
            return scales[b], zps[b]
        key = (dtype, device, *((t.data_ptr(), t._version) for t in (self.scale, self.zero_point)))
        cache = self.__dict__.get("_dmq_bin_params")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_dmq_bin_params"] = (key, *convert())
        return cache[1][b], cache[2][b]

    def lookup_as(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """This frozen static quantizer's output for a 16-bit CPU ``x``, bit for bit ``self(x).to(dtype)`` but in
        one lookup in a ``dtype`` table (a contiguous result; path ``static_table``): a float32 GEMM after it needs no
        cast of its input. None where the single-bin table path does not apply."""
        table = self.static_table(x, dtype)
        return None if table is None else lookup16(x, table)

    def static_table(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The 65536-entry table this frozen static quantizer looks the 16-bit CPU ``x`` up in (results in
        ``dtype``, default ``x.dtype``), or None where the single-bin table path does not apply."""
        if not self.enabled or self.spec.dynamic or not self.frozen or CONTEXT.calibrating:
            return None
        one = self._one_bin(x, dtype)
        return None if one is None else one[2]

    def _bin_table(self, b: int, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Bin ``b``'s :func:`~dmq.fake_quant.fake_quant_table` for a 16-bit CPU ``x`` (path ``static_table``): one
        lookup per element instead of the divide, round, clamp and multiply passes. One table (128 KiB; 256 KiB for
        a float32 result, :meth:`lookup_as`) is kept per quantizer, dtype and result dtype, for the last bin used: a
        sampler walks the bins in order, so each is built once per sampling run (about 0.3 ms), and a 28-block
        DiT-XL/2 holds about 35 MiB of them rather than four times that. It is kept with the very ``scale`` /
        ``zp`` tensors :meth:`_bin_params` keeps, so a reload (new tensors) rebuilds it; None where it does not apply
        (inference-mode buffers, whose parameters are rebuilt on every call, or a gradient)."""
        if (x.dtype.itemsize != 2 or x.device.type != "cpu" or "static_table" in DISABLED
                or (x.requires_grad and torch.is_grad_enabled()) or self.scale.is_inference()
                or self.zero_point.is_inference()):
            return None
        tables = self.__dict__.setdefault("_dmq_bin_tables", {})
        key = x.dtype if out_dtype in (None, x.dtype) else (x.dtype, out_dtype)
        hit = tables.get(key)
        if hit is None or hit[0] is not scale or hit[1] is not zp:
            t = fq.fake_quant_table(self.fmt, scale, zp, x.dtype)
            hit = tables[key] = (scale, zp, t if key is x.dtype else t.to(out_dtype))
        return hit[2]

    def static_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen ``scale`` and ``zero_point`` (None if symmetric) that apply to ``x``, shaped ``(B or 1, 1, ..)``
        to broadcast against it: one set per sample's timestep bin."""
        bins = self.current_bins(x.shape[0])
        if bins is not None:
            idx = bins.to(self.scale.device)
        elif self.num_bins > 1:  # no usable timestep: the widest bin never clips
            if not torch.compiler.is_compiling():
                self._warn_once("nobin", "no usable timestep for a timestep-binned quantizer: using the widest bin")
            idx = torch.argmax(self.scale).reshape(1)
        else:
            idx = torch.zeros(1, dtype=torch.long, device=self.scale.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale = self.scale[idx].reshape(shape)
        zp = None if self.spec.symmetric else self.zero_point[idx].reshape(shape)
        return scale, zp

    # --------------------------------------------------------------------------------------- freezing
    def fall_back_to_dynamic(self) -> None:
        """No statistics were observed: quantize each input with its own per-tensor min-max scale instead (same
        format and symmetry), a choice that needs no calibration data and is never worse-clipped than a guess."""
        self.spec = dataclasses.replace(self.spec, dynamic=True, granularity="tensor", timestep_bins=1)
        self.num_bins = 1
        self.scale = self.scale.new_ones(1)
        self.zero_point = self.zero_point.new_zeros(1)
        if self.observer is not None:
            self._counts = self.value_counts()
        self.observer = None
        self.frozen = True

    def value_counts(self) -> tuple[list[int], list[int]]:
        """``(finite, nonfinite)``: activation values seen during calibration per timestep bin (kept after
        :meth:`freeze`; zeros for a dynamic or loaded quantizer)."""
        obs = self.observer
        if obs is not None:
            return obs.count.tolist(), obs.nonfinite_bins.tolist()
        return getattr(self, "_counts", ([0] * self.num_bins, [0] * self.num_bins))

    def frozen_params(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-bin ``(scale, zero_point)`` that :meth:`freeze` would set (``None`` if already frozen), computed
        without changing anything; :class:`NotCalibratedError` saying what the quantizer saw if it has no finite
        calibration data."""
        if self.frozen:
            return None
        obs = self.observer
        seen = obs.observed_bins() if obs is not None else []
        if not seen:
            nonfinite = obs.nonfinite if obs is not None else 0
            if nonfinite:
                raise NotCalibratedError(f"saw only non-finite activation values during calibration ({nonfinite} "
                                         "NaN/inf, no finite value)")
            raise NotCalibratedError("no calibration data: it saw no activation during dmq.calibrate")
        s = self.spec
        scales, zps = [], []
        for k in range(self.num_bins):
            src = k if k in seen else min(seen, key=lambda j: abs(j - k))  # empty bin: nearest observed bin
            lo, hi = obs.estimate_range(src, self.fmt, s.symmetric, s.estimator, s.percentile)
            scale, zp = params_from_range(torch.tensor(lo), torch.tensor(hi), self.fmt, s.symmetric)
            scales.append(float(scale))
            zps.append(0.0 if zp is None else float(zp))
        kw = {"dtype": self.scale.dtype, "device": self.scale.device}
        return torch.tensor(scales, **kw), torch.tensor(zps, **kw)

    def freeze(self, params: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fix the per-bin parameters (``params`` from :meth:`frozen_params`, computed if not given) and drop the
        observer."""
        if params is None:
            params = self.frozen_params()
        if self.observer is not None:
            self._counts = self.value_counts()
        if params is not None:
            self.scale, self.zero_point = params  # new buffers, not copies into the old (rollback keeps those)
        self.observer = None
        self.frozen = True
