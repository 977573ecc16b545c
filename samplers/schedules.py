"""Noise schedules as continuous maps between model time ``t`` and ``ρ = σ/α`` (float64, NumPy).

Both families share the exponential-integrator form of the probability-flow ODE: with ``y = x/α`` and ``ρ = σ/α``,
``dy/dρ = ε`` (Zhang & Chen 2023, DEIS, Eq. 9 in the ρ parameterisation). They differ only in ``α(ρ)`` and in how the
model's time ``t`` maps to ``ρ``:

* :class:`VPSchedule`, discrete ``alphas_cumprod`` (DDPM, SD, DiT, PixArt): ``α = (1+ρ²)^-½``. ``log ρ`` is linear
  between integer timesteps, the inverse of diffusers' ``_sigma_to_t`` and what the model sees at fractional ``t``.
  Below ``t = 0`` ``ρ`` falls linearly to ``0`` at ``t = -1``, diffusers' ``final_alpha_cumprod = 1`` convention.
  A smooth (cubic) interpolant of ``log ᾱ`` was measured as an alternative for the tAB basis integrals. It changed the
  GMM benchmark errors only in the third digit, so the model-consistent log-linear map is used everywhere.
* :class:`FlowSchedule`, rectified flow (SD3, Flux): ``s = t/T``, ``σ = s``, ``α = 1-s``, ``ρ = s/(1-s)``, so
  ``α = 1/(1+ρ)``. ``ρ = ∞`` at ``s = 1``.
* :class:`EDMSchedule`, EDM-trained models (Karras et al. 2022; Stable Video Diffusion): the VP ``α(ρ)`` with
  ``ρ = σ_EDM`` on ``[sigma_min, sigma_max]`` and the model time ``t = c_noise = ln(ρ)/4`` (Table 1 of the paper).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "EDMSchedule",
    "FlowSchedule",
    "NoiseSchedule",
    "VPSchedule",
    "alphas_cumprod_from_config",
    "betas_from_config",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: list[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
    snr_shift_scale: float = 1.0,
) -> torch.Tensor:
    """diffusers' float32 ``betas`` for a scheduler config (``trained_betas`` wins and sets their number).

    With ``rescale_betas_zero_snr`` the last beta is 1 (Lin et al. 2024, Alg. 1: zero terminal SNR). With
    ``snr_shift_scale != 1`` (CogVideoX) they are the betas of the shifted ``ᾱ`` (:func:`alphas_cumprod_from_config`).
    """
    if snr_shift_scale != 1.0:
        ac = torch.from_numpy(alphas_cumprod_from_config(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                         trained_betas, rescale_betas_zero_snr, snr_shift_scale))
        return (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).float()
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or trained_betas), got {beta_schedule!r}")
    if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
    return _rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def alphas_cumprod_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: list[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
    snr_shift_scale: float = 1.0,
) -> np.ndarray:
    """``ᾱ`` as float64, bit-identical to diffusers' float32 ``alphas_cumprod`` for the same config.

    ``snr_shift_scale = s`` is CogVideoX's SNR shift (``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``):
    ``ᾱ ← ᾱ / (s + (1 - s) ᾱ)``, which divides every SNR ``ᾱ / (1 - ᾱ)`` by ``s``, applied to ``ᾱ`` (in float64)
    before the zero-terminal-SNR rescale, as those schedulers do.

    With ``rescale_betas_zero_snr`` the last ``ᾱ`` is 0 (Lin et al. 2024, Alg. 1). diffusers then clamps it to
    ``2⁻²⁴`` so that ``ρ`` stays finite. With many train steps the one before it is already below ``2⁻²⁴``, so the
    clamp is ``min(2⁻²⁴, ᾱ_{T-2}² / ᾱ_{T-3})`` (log-linear extrapolation): ``ρ`` stays finite and strictly increasing.
    The model sees ``x_T`` at ``α ≈ 0`` either way; the sampler's first ``x̂0`` is that of a ``v``-model at SNR 0.
    """
    if snr_shift_scale != 1.0:
        betas = betas_from_config(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas).double()
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac = ac / (snr_shift_scale + (1 - snr_shift_scale) * ac)
        if rescale_betas_zero_snr:  # Lin et al. 2024, Alg. 1 on sqrt(ᾱ)
            root = ac.sqrt()
            ac = ((root - root[-1]) * (root[0] / (root[0] - root[-1]))) ** 2
        ac = ac.numpy()
    else:
        betas = betas_from_config(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        ac = torch.cumprod(1.0 - betas, dim=0).double().numpy()
    if rescale_betas_zero_snr:
        ac[-1] = min(2.0**-24, ac[-2] ** 2 / ac[-3]) if ac.size >= 3 else 2.0**-24
    return ac


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Algorithm 1 (float32)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


class NoiseSchedule:
    """A continuous, increasing map ``t ↦ ρ(t)`` with ``ρ(t_clean) = 0``; subclasses fix ``α(ρ)``.

    ``t_min``/``t_max`` bound the timesteps at which the model may be evaluated.
    """

    kind: str
    num_train_timesteps: int
    t_clean: float
    t_min: float
    t_max: float

    def rho(self, t: np.ndarray | float) -> np.ndarray:
        raise NotImplementedError

    def drho_dt(self, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def t_of_rho(self, rho: np.ndarray | float) -> np.ndarray:
        raise NotImplementedError

    def alpha_sigma(self, rho: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def breakpoints(self, lo: float, hi: float) -> np.ndarray:
        """Sorted points ``lo = p_0 < … < p_m = hi`` such that ``ρ`` is analytic (and well resolved) on each piece."""
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """Discrete VP schedule from ``alphas_cumprod``; ``t ∈ [-1, T-1]`` with ``t = -1`` meaning ``σ = 0``."""

    kind = "vp"
    t_clean = -1.0
    t_min = 0.0

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rho = 0.5 * (np.log1p(-ac) - np.log(ac))
        if ac.ndim != 1 or ac.size < 2 or not np.all(np.isfinite(log_rho)) or not np.all(np.diff(log_rho) > 0):
            raise ValueError("alphas_cumprod must be 1-D, lie in (0, 1) and be strictly decreasing")
        self.log_rho = log_rho  # (T,) log sqrt((1-ᾱ)/ᾱ), strictly increasing
        self.num_train_timesteps = ac.size
        self.t_max = float(ac.size - 1)

    def _piece(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.clip(np.floor(t).astype(np.int64), 0, self.num_train_timesteps - 2)
        return k, self.log_rho[k + 1] - self.log_rho[k]

    def rho(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        k, slope = self._piece(t)
        inside = np.exp(self.log_rho[k] + (t - k) * slope)
        return np.where(t < 0, math.exp(self.log_rho[0]) * (t + 1), inside)

    def drho_dt(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        _, slope = self._piece(t)
        return np.where(t < 0, math.exp(self.log_rho[0]), self.rho(t) * slope)

    def t_of_rho(self, rho: np.ndarray | float) -> np.ndarray:
        rho = np.asarray(rho, dtype=np.float64)
        rho0 = math.exp(self.log_rho[0])
        knots = np.arange(self.num_train_timesteps, dtype=np.float64)
        inside = np.interp(np.log(np.maximum(rho, rho0)), self.log_rho, knots)
        return np.where(rho < rho0, rho / rho0 - 1, inside)

    def alpha_sigma(self, rho: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        rho = np.asarray(rho, dtype=np.float64)
        alpha = 1 / np.sqrt(1 + rho * rho)
        return alpha, rho * alpha

    def breakpoints(self, lo: float, hi: float) -> np.ndarray:
        inner = np.arange(math.floor(lo) + 1, math.ceil(hi), dtype=np.float64)
        return np.concatenate([[lo], inner[(inner > lo) & (inner < hi)], [hi]])


class FlowSchedule(NoiseSchedule):
    """Rectified flow, ``σ = t/T``; ``t ∈ [0, T]`` with ``t = 0`` meaning ``σ = 0`` and ``t = T`` meaning ``α = 0``."""

    kind = "flow"
    t_clean = 0.0
    t_min = 0.0

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        self.t_max = float(num_train_timesteps)

    def rho(self, t: np.ndarray | float) -> np.ndarray:
        s = np.asarray(t, dtype=np.float64) / self.num_train_timesteps
        with np.errstate(divide="ignore"):
            return np.where(s >= 1, np.inf, s / np.maximum(1 - s, 1e-300))

    def drho_dt(self, t: np.ndarray) -> np.ndarray:
        s = np.asarray(t, dtype=np.float64) / self.num_train_timesteps
        return 1 / (self.num_train_timesteps * (1 - s) ** 2)

    def t_of_rho(self, rho: np.ndarray | float) -> np.ndarray:
        rho = np.asarray(rho, dtype=np.float64)
        inf = np.isinf(rho)
        finite = np.where(inf, 0.0, rho)
        return np.where(inf, float(self.num_train_timesteps), self.num_train_timesteps * finite / (1 + finite))

    def alpha_sigma(self, rho: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        rho = np.asarray(rho, dtype=np.float64)
        inf = np.isinf(rho)
        finite = np.where(inf, 0.0, rho)
        return np.where(inf, 0.0, 1 / (1 + finite)), np.where(inf, 1.0, finite / (1 + finite))

    def breakpoints(self, lo: float, hi: float) -> np.ndarray:
        """Dyadic pieces ``1 - s ∈ [2^-k-1, 2^-k]`` towards the pole of ``ρ`` at ``s = 1``: each piece is at least its
        own length away from the pole, so Gauss-Legendre converges geometrically on it."""
        inner = self.num_train_timesteps * (1 - 2.0 ** -np.arange(1, 60))
        return np.concatenate([[lo], inner[(inner > lo) & (inner < hi)], [hi]])


class EDMSchedule(NoiseSchedule):
    """EDM noise levels in VP coordinates: ``x_VP = x_EDM / sqrt(1+σ²)`` (what diffusers' Euler ``scale_model_input``
    feeds the model), so ``ρ = σ``, ``α = (1+ρ²)^-½``, and EDM's v-prediction is the VP one. The model time is
    ``t = ln(ρ)/4`` on ``[ln(sigma_min)/4, ln(sigma_max)/4]`` (Karras et al. 2022, Table 1, ``c_noise``); below
    ``t_min`` ``ρ`` falls linearly to 0 at ``t_min - 1``, as :class:`VPSchedule` does below ``t = 0``."""

    kind = "vp"

    def __init__(self, sigma_min: float, sigma_max: float, num_train_timesteps: int = 1000) -> None:
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, {sigma_max!r}")
        self.rho_min, self.rho_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = math.log(self.rho_min) / 4, math.log(self.rho_max) / 4
        self.t_clean = self.t_min - 1.0
        self.num_train_timesteps = int(num_train_timesteps)

    def rho(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.where(t < self.t_min, self.rho_min * (t - self.t_clean), np.exp(4 * np.maximum(t, self.t_min)))

    def drho_dt(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.where(t < self.t_min, self.rho_min, 4 * self.rho(t))

    def t_of_rho(self, rho: np.ndarray | float) -> np.ndarray:
        rho = np.asarray(rho, dtype=np.float64)
        inside = np.log(np.maximum(rho, self.rho_min)) / 4
        return np.where(rho < self.rho_min, rho / self.rho_min + self.t_clean, inside)

    def alpha_sigma(self, rho: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        rho = np.asarray(rho, dtype=np.float64)
        alpha = 1 / np.sqrt(1 + rho * rho)
        return alpha, rho * alpha

    def breakpoints(self, lo: float, hi: float) -> np.ndarray:
        """Pieces of ``Δt = 1/4`` (``ρ`` grows by ``e`` on each) above ``t_min``, and the linear piece below it."""
        inner = np.concatenate([[self.t_min], self.t_min + 0.25 * np.arange(1, math.ceil(4 * (hi - self.t_min)) + 1)])
        return np.concatenate([[lo], inner[(inner > lo) & (inner < hi)], [hi]])
