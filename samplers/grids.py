"""Sampling time grids: decreasing model timesteps of the ``n`` evaluations (the final target ``σ = 0`` is implied).

Zhang & Chen 2023 (DEIS), Sec. 5 and ``th_deis/sde.py:get_rev_ts``: a power law in ``t`` (``κ = 1`` uniform,
``κ = 2`` quadratic), a power law in ``ρ`` (``κ = 7`` is Karras et al. 2022, Eq. 5), or uniform ``log ρ`` (uniform
logSNR, Lu et al. 2022). ``spacing_timesteps`` reproduces diffusers' ``timestep_spacing``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TIMESTEP_SPACINGS",
    "TIME_GRIDS",
    "beta_grid",
    "flow_shift",
    "log_rho_grid",
    "power_grid",
    "rho_power_grid",
    "spacing_timesteps",
]

TIME_GRIDS = ("time", "rho", "log_rho", "beta", "spacing")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def power_grid(hi: float, lo: float, n: int, power: float) -> np.ndarray:
    """``lo + (hi - lo)(1 - i/n)^κ`` for ``i = 0..n-1``: from ``hi`` towards ``lo``, which is the final target and
    is not included (DEIS ``get_rev_ts`` with ``ts_phase="t"``)."""
    return lo + (hi - lo) * (1 - np.arange(n) / n) ** power


def rho_power_grid(rho_max: float, rho_min: float, n: int, power: float = 7.0) -> np.ndarray:
    """``n`` values from ``ρ_max`` to ``ρ_min`` (both included), uniform in ``ρ^(1/κ)`` (Karras et al. 2022, Eq. 5)."""
    if n == 1:
        return np.array([rho_max])
    ramp = np.arange(n) / (n - 1)
    return (rho_max ** (1 / power) + ramp * (rho_min ** (1 / power) - rho_max ** (1 / power))) ** power


def log_rho_grid(rho_max: float, rho_min: float, n: int) -> np.ndarray:
    """``n`` values from ``ρ_max`` to ``ρ_min`` uniform in ``log ρ`` (uniform logSNR ``λ = -log ρ``)."""
    if n == 1:
        return np.array([rho_max])
    return np.exp(np.linspace(np.log(rho_max), np.log(rho_min), n))


def beta_grid(rho_max: float, rho_min: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """``n`` values from ``ρ_max`` to ``ρ_min`` at the quantiles of a Beta(a, b) law: dense at both ends of the
    noise range (Lee et al. 2024, "Beta Sampling is All You Need", Sec. 4; a = b = 0.6 as in diffusers)."""
    from scipy.stats import beta  # scipy is a dependency; imported here to keep `import samplers` light

    if n == 1:
        return np.array([rho_max])
    q = beta.ppf(1 - np.arange(n) / (n - 1), a, b)
    return rho_min + q * (rho_max - rho_min)


def spacing_timesteps(n: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """diffusers' multistep ``timestep_spacing`` (DPMSolverMultistep / DEIS / UniPC), as integer-valued floats.

    Where rounding would repeat a timestep (``n`` close to or above ``num_train_timesteps``) the same spacing is
    returned unrounded, so that every one of the ``n`` evaluations is at a distinct noise level.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    T = num_train_timesteps
    if spacing == "linspace":
        exact = np.linspace(0, T - 1, n + 1)[::-1][:-1]
    elif spacing == "leading":
        step = T // (n + 1)
        exact = (np.arange(0, n + 1) * (step if step >= 1 else T / (n + 1)))[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        exact = np.arange(T, 0, -T / n)[:n] - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    rounded = exact.round()
    if np.all(np.diff(rounded) < 0):
        return rounded.astype(np.float64)
    return np.clip(exact, 0, T - 1).astype(np.float64)


def flow_shift(sigmas: np.ndarray, scale: float) -> np.ndarray:
    """``σ' = mσ / (1 + (m-1)σ)``, i.e. ``ρ' = m ρ``: SD3's static shift (``m = shift``) and Flux's exponential time
    shift (``m = e^μ``) (Esser et al. 2024, Eq. 23)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return scale * sigmas / (1 + (scale - 1) * sigmas)
