"""LLM-FP4 (Liu et al., 2023) format search: per layer, the split of a minifloat's bits between exponent and
mantissa, and its exponent bias, chosen by the layer's output error on calibration inputs.

For a weight spec ``eXmY`` the candidates are every ``eX'mY'`` of the same width (``X' + Y' = X + Y``, ``X' >= 1``),
each with its exponent-bias search (the ``fp_bias`` estimator: a real-valued bias is a scale, searched by
reconstruction error per channel). The winner minimises ``trace((W - Q(W)) H (W - Q(W))^T)``, ``H = X^T X / N``,
the mean squared output error over the cached input rows. INT and block formats are returned unchanged.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from dmq.config import QuantSpec
from dmq.rounding.adaround import layer_error
from dmq.rounding.grid import weight_grid


def candidates(spec: QuantSpec) -> list[QuantSpec]:
    """Same-width minifloat specs with the exponent-bias search (the spec itself first)."""
    m = re.fullmatch(r"e(\d)m(\d)", spec.format)
    if m is None:
        return [spec]
    width = int(m.group(1)) + int(m.group(2))
    out = [replace(spec, estimator="fp_bias")]
    for e in range(1, min(width, 5) + 1):
        name = f"e{e}m{width - e}"
        if name != spec.format:
            out.append(replace(spec, format=name, estimator="fp_bias"))
    return out


def search_format(w: torch.Tensor, hess: torch.Tensor, spec: QuantSpec, split: int | None = None
                  ) -> tuple[QuantSpec, dict[str, float]]:
    """The spec among :func:`candidates` with the least output error, and every candidate's error."""
    rows = w.reshape(w.shape[0], -1).float()
    errs: dict[str, float] = {}
    best, best_err = spec, None
    for cand in candidates(spec):
        q = weight_grid(w, cand, split).nearest(rows)
        err = layer_error(hess, rows, q)
        errs[cand.format] = err
        if best_err is None or err < best_err:
            best, best_err = cand, err
    return best, errs
