"""UniPC in data-prediction form as float64 coefficient arithmetic (Zhao et al., "UniPC", NeurIPS 2023).

Every update is a fixed linear combination ``x' = cx · x + Σ_j w_j · m_{k-j}`` (history of ``x̂0`` newest first, and
for the corrector the new output ``m_t`` first). The coefficients depend only on the logSNRs ``λ = log(α/σ)``, so they
are computed once per ``set_timesteps``. With ``hh = -h``, ``h = λ_t - λ_s0``:

* UniP-p (paper Alg. 2 / Eq. 6):  ``x_t = (σ_t/σ_s0) x - α_t (e^hh - 1) m_0 - α_t B(h) Σ_k a_k D_k``;
* UniC-p (paper Alg. 1 / Eq. 8):  ``x_t^c = … - α_t B(h) (Σ_{k<p} c_k D_k + c_p (m_t - m_0))``;

``D_k = (m_k - m_0)/r_k``, ``r_k = (λ_k - λ_s0)/h``, ``a = R_{p-1}^{-1} b`` (``[½]`` for p = 2), ``c = R_p^{-1} b``
(``[½]`` for p = 1), ``b_i = hh φ_{i+1}(hh) i!/B(hh)``; ``B = hh`` (``bh1``) or ``e^hh - 1`` (``bh2``).
A step to ``σ = 0`` (``λ = ∞``) is the exact limit ``x' = m_0`` for every order and variant (no ``-∞ · 0``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SOLVER_TYPES", "unic_coefficients", "unip_coefficients", "uni_b"]

SOLVER_TYPES = ("bh1", "bh2")


def uni_b(hh: float, order: int, solver_type: str) -> tuple[float, np.ndarray]:
    """``(B(hh), b_1..b_p)`` with ``b_i = hh φ_{i+1}(hh) i! / B(hh)`` (UniPC, Eq. 5 and Thm. 3.1)."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    phi1 = math.expm1(hh)
    big_b = hh if solver_type == "bh1" else phi1
    h_phi_k, fact, b = phi1 / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / big_b)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return big_b, np.array(b)


def _common(lam_hist: list[float], lam_t: float, alpha_t: float, sigma_t: float, sigma_s0: float):
    h = lam_t - lam_hist[0]
    rks = np.array([(lam - lam_hist[0]) / h for lam in lam_hist[1:]], dtype=np.float64)
    return -h, rks, sigma_t / sigma_s0, -alpha_t * math.expm1(-h)


def unip_coefficients(
    lam_hist: list[float], lam_t: float, alpha_t: float, sigma_t: float, sigma_s0: float, order: int, solver_type: str
) -> tuple[float, list[float]]:
    """UniP-``order`` from ``λ_s0 = lam_hist[0]`` to ``λ_t``: ``(cx, [w_0..w_{p-1}])`` over ``m_0, m_1, …``.

    ``lam_hist`` lists the logSNRs of the history, newest first (at least ``order`` entries are used).
    """
    if sigma_t == 0 or math.isinf(lam_t):
        return 0.0, [1.0] + [0.0] * (order - 1)
    hh, rks, cx, w0 = _common(lam_hist[:order], lam_t, alpha_t, sigma_t, sigma_s0)
    w = [w0] + [0.0] * (order - 1)
    if order >= 2:
        big_b, b = uni_b(hh, order, solver_type)
        if order == 2:
            a = np.array([0.5])
        else:
            R = np.vander(np.append(rks, 1.0), order, increasing=True).T  # R[i, k] = r_k^i
            a = np.linalg.solve(R[:-1, :-1], b[:-1])
        for k in range(1, order):
            d = alpha_t * big_b * a[k - 1] / rks[k - 1]
            w[k] -= d
            w[0] += d
    return cx, w


def unic_coefficients(
    lam_hist: list[float], lam_t: float, alpha_t: float, sigma_t: float, sigma_s0: float, order: int, solver_type: str
) -> tuple[float, list[float]]:
    """UniC-``order`` correcting the step ``λ_s0 = lam_hist[0] → λ_t``: ``(cx, [w_t, w_0..w_{p-1}])`` over
    ``m_t`` (the output at the predicted point) and the history ``m_0, m_1, …`` (newest first)."""
    hh, rks, cx, w0 = _common(lam_hist[:order], lam_t, alpha_t, sigma_t, sigma_s0)
    big_b, b = uni_b(hh, order, solver_type)
    if order == 1:
        c = np.array([0.5])
    else:
        R = np.vander(np.append(rks, 1.0), order, increasing=True).T
        c = np.linalg.solve(R, b)
    w = [0.0, w0] + [0.0] * (order - 1)
    for k in range(1, order):
        d = alpha_t * big_b * c[k - 1] / rks[k - 1]
        w[k + 1] -= d
        w[1] += d
    d = alpha_t * big_b * c[-1]
    w[0] -= d
    w[1] += d
    return cx, w
