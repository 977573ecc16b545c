"""The activation tensor quantizer: a :class:`~dmq.config.QuantSpec` plus its state (observer, then frozen scales,
one set per timestep bin)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from dmq.calibration import CONTEXT, sample_timesteps, timestep_bins
from dmq.config import QuantSpec
from dmq.fake_quant import fake_quant, from_rows, params_from_range, quantize_rows_dynamic, to_rows
from dmq.observers import StreamingObserver

logger = logging.getLogger(__name__)


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
        """Bin per sample (``(batch,)``), one bin (``(1,)``), or None for a single-bin quantizer."""
        if self.num_bins == 1:
            return None
        t = CONTEXT.timestep
        if t is None:
            return None
        bins = timestep_bins(sample_timesteps(t), self.num_bins, *self.timestep_range)
        if bins.numel() == 1 or bool((bins == bins[0]).all()):
            return bins[:1]
        if bins.numel() == batch:
            return bins
        if batch % bins.numel() == 0:  # (B * frames, ...) activations of video models, batch-major
            return bins.repeat_interleave(batch // bins.numel())
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if CONTEXT.calibrating:
            if self.spec.dynamic:
                return x
            if CONTEXT.observe and self.observer is not None:
                self.observer.observe(x, self.current_bins(x.shape[0]))
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
        rows = to_rows(x, dim)
        q = quantize_rows_dynamic(rows, self.fmt, s.granularity, s.group_size, s.symmetric)
        return from_rows(q, x, dim)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.static_params(x)
        return fake_quant(x, self.fmt, scale, zp)

    def static_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen ``scale`` and ``zero_point`` (None if symmetric) that apply to ``x``, shaped ``(B or 1, 1, ..)``
        to broadcast against it: one set per sample's timestep bin."""
        bins = self.current_bins(x.shape[0])
        if bins is None and self.num_bins > 1:
            # no usable timestep: the widest bin never clips
            if not bool((self.scale == self.scale[0]).all()):
                self._warn_once("nobin", "no usable timestep for a timestep-binned quantizer: using the widest bin")
            bins = torch.argmax(self.scale).reshape(1)
        idx = bins.to(self.scale.device) if bins is not None else torch.zeros(1, dtype=torch.long,
                                                                             device=self.scale.device)
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
        self.observer = None
        self.frozen = True

    def freeze(self) -> None:
        """Fix the per-bin parameters from the observed statistics and drop the observer."""
        if self.frozen:
            self.observer = None
            return
        obs = self.observer
        seen = obs.observed_bins() if obs is not None else []
        if not seen:
            raise NotCalibratedError(
                "static activation quantizer has no calibration data: run dmq.calibrate(model, forward_loop) "
                "before dmq.freeze (or use a dynamic/weight-only config)"
            )
        if obs.nonfinite:
            logger.warning("observer skipped %d non-finite (NaN/inf) activation values", obs.nonfinite)
        s = self.spec
        scales, zps = [], []
        for k in range(self.num_bins):
            src = k if k in seen else min(seen, key=lambda j: abs(j - k))  # empty bin: nearest observed bin
            lo, hi = obs.estimate_range(src, self.fmt, s.symmetric, s.estimator, s.percentile)
            scale, zp = params_from_range(torch.tensor(lo), torch.tensor(hi), self.fmt, s.symmetric)
            scales.append(float(scale))
            zps.append(0.0 if zp is None else float(zp))
        self.scale.copy_(torch.tensor(scales))
        self.zero_point.copy_(torch.tensor(zps))
        self.observer = None
        self.frozen = True
