"""Streaming activation statistics and the range estimators that read them.

One :class:`StreamingObserver` per static quantizer keeps, for each timestep bin, the running min and max and (for
the percentile and search estimators) a fixed-size signed histogram over ``[-R, R)``, ``R`` a power of two. When a
value reaches ``R`` the range doubles and adjacent bins merge, so memory is ``O(bins x nbins)`` whatever the number
of calibration points. Non-finite values are skipped and counted.
"""

from __future__ import annotations

import math

import torch

from dmq import formats
from dmq.fake_quant import fake_quant, params_from_range, search_candidates

NBINS = 4096


class StreamingObserver:
    """Running min/max and a doubling histogram per timestep bin."""

    def __init__(self, num_bins: int = 1, histogram: bool = True, nbins: int = NBINS):
        if nbins % 4:
            raise ValueError("nbins must be a multiple of 4")
        self.num_bins, self.nbins = num_bins, nbins
        self.min = torch.full((num_bins,), math.inf, dtype=torch.float64)
        self.max = torch.full((num_bins,), -math.inf, dtype=torch.float64)
        self.count = torch.zeros(num_bins, dtype=torch.int64)
        self.hist = torch.zeros(num_bins, nbins, dtype=torch.float64) if histogram else None
        self.radius = torch.zeros(num_bins, dtype=torch.float64)
        self.nonfinite_bins = torch.zeros(num_bins, dtype=torch.int64)  # skipped NaN / inf values per bin

    @property
    def nonfinite(self) -> int:
        """Non-finite values skipped, over all bins."""
        return int(self.nonfinite_bins.sum())

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.min, self.max, self.count, self.radius,
                                                       self.nonfinite_bins))
        return n + (self.hist.numel() * 8 if self.hist is not None else 0)

    def observe(self, x: torch.Tensor, sample_bins: torch.Tensor | None = None) -> None:
        """Add ``x``; ``sample_bins`` is a bin index per entry of dim 0 (or None: bin 0 / the single bin)."""
        x = x.detach()
        if sample_bins is None or sample_bins.numel() == 1:
            self._update(0 if sample_bins is None else int(sample_bins), x.reshape(-1))
            return
        for b in sample_bins.unique().tolist():
            self._update(b, x[(sample_bins == b).to(x.device)].reshape(-1))

    def _update(self, k: int, flat: torch.Tensor) -> None:
        flat = flat.float()
        finite = torch.isfinite(flat)
        if not bool(finite.all()):
            self.nonfinite_bins[k] += int((~finite).sum())
            flat = flat[finite]
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        lo, hi = float(lo), float(hi)
        self.min[k] = min(float(self.min[k]), lo)
        self.max[k] = max(float(self.max[k]), hi)
        self.count[k] += flat.numel()
        if self.hist is None:
            return
        amax = max(abs(lo), abs(hi))
        if amax == 0:  # only zeros: the middle bin at any radius; the radius waits for a non-zero value
            self.hist[k, self.nbins // 2] += flat.numel()
            return
        if self.radius[k] == 0:
            self.radius[k] = 2.0 ** (math.floor(math.log2(amax)) + 1)
        while amax >= self.radius[k]:
            self._double(k)
        self.hist[k] += self._binned(flat, float(self.radius[k])).cpu()

    def _binned(self, flat: torch.Tensor, r: float) -> torch.Tensor:
        """Counts of ``flat`` (all ``|x| < r``, ``r`` a power of two) in ``nbins`` half-open bins over ``[-r, r)``.

        The index ``nbins/2 + floor(x * nbins / (2r))`` only scales by a power of two, so it is exact: binning at
        radius ``2r`` equals binning at ``r`` then :meth:`_double`. That makes the histogram
        independent of the order and the split of the data, which :func:`dmq.sync_statistics` relies on.
        """
        idx = torch.floor(flat.double() * (self.nbins / (2 * r))).long().add_(self.nbins // 2)
        idx.clamp_(0, self.nbins - 1)
        return torch.bincount(idx, minlength=self.nbins).double()

    def _double(self, k: int) -> None:
        """Range ``[-R, R)`` -> ``[-2R, 2R)``: pairs of bins merge into the middle half."""
        n = self.nbins
        merged = self.hist[k].reshape(n // 2, 2).sum(-1)
        self.hist[k].zero_()
        self.hist[k, n // 4: 3 * n // 4] = merged
        self.radius[k] *= 2

    def observed_bins(self) -> list[int]:
        return [k for k in range(self.num_bins) if self.count[k] > 0]

    # ------------------------------------------------------------------------------------- range estimation
    def _centers(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = float(self.radius[k])
        edges = torch.linspace(-r, r, self.nbins + 1, dtype=torch.float64)
        centers = (edges[1:] + edges[:-1]) / 2
        counts = self.hist[k]
        keep = counts > 0
        return centers[keep], counts[keep]

    def _quantile(self, k: int, q: float, absolute: bool) -> float:
        c, n = self._centers(k)
        if absolute:
            c = c.abs()
        order = torch.argsort(c)
        c, cdf = c[order], torch.cumsum(n[order], 0) / n.sum()
        i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(max=c.numel() - 1))
        return float(c[i])

    def estimate_range(self, k: int, fmt: formats.Format, symmetric: bool, estimator: str,
                       percentile: float = 99.99) -> tuple[float, float]:
        """``(lo, hi)`` of bin ``k`` by the given estimator."""
        lo, hi = float(self.min[k]), float(self.max[k])
        if estimator == "minmax" or self.hist is None:
            return lo, hi
        if estimator == "percentile":
            p = percentile / 100.0
            if symmetric:
                a = min(self._quantile(k, p, absolute=True), max(abs(lo), abs(hi)))
                return -a, a
            return max(self._quantile(k, 1 - p, False), lo), min(self._quantile(k, p, False), hi)
        c, n = self._centers(k)
        m = torch.tensor(search_candidates(estimator), dtype=torch.float64).unsqueeze(1)  # (C, 1): all at once
        scale, zp = params_from_range(lo * m, hi * m, fmt, symmetric)
        err = (n * (fake_quant(c.expand(m.shape[0], -1), fmt, scale, zp) - c) ** 2).sum(-1)
        best = float(m[int(torch.argmin(err)), 0])
        return lo * best, hi * best
