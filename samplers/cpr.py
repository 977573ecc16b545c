"""Cascade polynomial regression of DC ratios (DC-Solver, Zhao et al. ECCV 2024, Sec. 3.4, Eq. 12).

``ρ(step) = Σ_k c_k s^k`` (cubic, ``s = step/NFE``), ``c_k = Σ_j A_kj g^j`` (quadratic, ``g = CFG/12``),
``A_kj = Σ_l P_kjl n^l`` (quadratic, ``n = NFE/50``): 4·3·3 = 36 coefficients ``P[k, j, l]`` (ascending powers).
``ρ`` is linear in ``P``, so the fit is an exact linear least-squares problem over the searched ratios.
Steps before ``first_step`` (where compensation cannot apply) are fixed at ``ρ = 1`` and not fitted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CascadePolynomialRegression"]

SHAPE = (4, 3, 3)


def _features(step: np.ndarray, nfe: np.ndarray, guidance: np.ndarray) -> np.ndarray:
    """``(len, 36)`` monomials ``s^k g^j n^l`` in the order of ``P.ravel()``."""
    s, g, n = step / nfe, guidance / 12.0, nfe / 50.0
    cols = [s**k * g**j * n**l for k in range(4) for j in range(3) for l in range(3)]  # noqa: E741
    return np.stack(cols, axis=-1)


@dataclass(frozen=True)
class CascadePolynomialRegression:
    """Fitted CPR: ``coefficients`` ``(4, 3, 3)`` = ``P[k (s power), j (g power), l (n power)]``, and the fitted
    ``nfe_range`` / ``guidance_range`` outside which :meth:`predict` refuses to extrapolate unless asked."""

    coefficients: np.ndarray
    nfe_range: tuple[float, float]
    guidance_range: tuple[float, float]
    first_step: int = 2

    @classmethod
    def fit(
        cls, samples: Iterable[tuple[int, float, Sequence[float]]], first_step: int = 2
    ) -> CascadePolynomialRegression:
        """Least squares over ``(nfe, guidance, ratios)`` triples (``len(ratios) == nfe``); steps ``< first_step``
        are ignored. Needs at least 3 distinct NFE and 3 distinct guidance values (else the cascade is not
        identifiable)."""
        rows, ys, nfes, gs = [], [], set(), set()
        for nfe, g, ratios in samples:
            ratios = np.asarray(ratios, dtype=np.float64)
            if len(ratios) != nfe:
                raise ValueError(f"ratios for nfe={nfe} must have {nfe} values, got {len(ratios)}")
            steps = np.arange(first_step, nfe, dtype=np.float64)
            rows.append(_features(steps, np.full_like(steps, nfe), np.full_like(steps, g)))
            ys.append(ratios[first_step:])
            nfes.add(int(nfe))
            gs.add(float(g))
        if len(nfes) < 3 or len(gs) < 3:
            raise ValueError(f"CPR needs >= 3 distinct NFE and guidance values, got NFE {sorted(nfes)}, "
                             f"guidance {sorted(gs)}")
        a, y = np.concatenate(rows), np.concatenate(ys)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return cls(coef.reshape(SHAPE), (min(nfes), max(nfes)), (min(gs), max(gs)), first_step)

    def predict(self, nfe: int, guidance: float, extrapolate: bool = False) -> list[float]:
        """Ratios for the ``nfe`` steps at this guidance (``1`` before ``first_step``)."""
        lo, hi = self.nfe_range
        glo, ghi = self.guidance_range
        inside = lo <= nfe <= hi and glo - 1e-9 <= guidance <= ghi + 1e-9
        if not inside and not extrapolate:
            raise ValueError(
                f"(nfe={nfe}, guidance={guidance}) is outside the fitted range nfe {lo}..{hi}, guidance {glo}..{ghi}; "
                "pass extrapolate=True to predict anyway"
            )
        steps = np.arange(self.first_step, nfe, dtype=np.float64)
        pred = _features(steps, np.full_like(steps, nfe), np.full_like(steps, guidance)) @ self.coefficients.ravel()
        return [1.0] * min(self.first_step, nfe) + [float(v) for v in pred]

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "coefficients": [float(v) for v in self.coefficients.ravel()],
            "layout": "P[k, j, l]: s^k g^j n^l, s = step/NFE, g = CFG/12, n = NFE/50 (C order)",
            "nfe_range": list(self.nfe_range),
            "guidance_range": list(self.guidance_range),
            "first_step": self.first_step,
        }

    @classmethod
    def from_dict(cls, d: dict | Sequence[float]) -> CascadePolynomialRegression:
        """From :meth:`to_dict` (or a bare list of 36 coefficients: then the range is unbounded)."""
        if not isinstance(d, dict):
            d = {"coefficients": list(d), "nfe_range": [1, math.inf], "guidance_range": [-math.inf, math.inf]}
        coef = np.asarray(d.get("coefficients", ()), dtype=np.float64)
        if coef.size != 36 or not np.all(np.isfinite(coef)):
            raise ValueError(f"cpr coefficients must be 36 finite floats, got {coef.size}")
        return cls(coef.reshape(SHAPE), tuple(d["nfe_range"]), tuple(d["guidance_range"]), int(d.get("first_step", 2)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CascadePolynomialRegression:
        return cls.from_dict(json.loads(Path(path).read_text()))
