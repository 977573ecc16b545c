"""An exact denoiser for class-conditional Gaussian-mixture data, and a reference probability-flow ODE solution.

Data ``x0`` of shape ``shape`` (``D`` elements) follows, for class ``c``, the mixture
``p(x0 | c) = Σ_k w_ck N(x0; μ_ck, Σ_ck)`` with ``Σ_ck = U_ck diag(λ_ck) U_ckᵀ``; classes have a uniform prior.
A noisy sample ``x = α x0 + σ ε`` (``ε ~ N(0, I)``) then has the marginal ``Σ_k w_k N(x; α μ_k, α² Σ_k + σ² I)``
and, per component, ``(α² Σ_k + σ² I)^-1 = U_k diag(1 / (α² λ_k + σ²)) U_kᵀ``, so everything below is exact:

* ``E[x0 | x] = Σ_k r_k (μ_k + α Σ_k (α² Σ_k + σ² I)^-1 (x - α μ_k))``,
* ``E[ε | x] = -σ ∇_x log p(x) = Σ_k r_k σ (α² Σ_k + σ² I)^-1 (x - α μ_k)``,

with responsibilities ``r_k ∝ w_k N(x; α μ_k, α² Σ_k + σ² I)`` computed with logsumexp. Both are evaluated
directly (not one from the other), so they stay accurate as ``σ → 0`` and as ``α → 0``.

:class:`GMMDenoiser` wraps a mixture as a diffusers-style backbone (VP discrete schedule or rectified flow), and
:func:`reference_sample` integrates the probability-flow ODE with DOP853 at tight tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput
from scipy.integrate import solve_ivp

__all__ = ["GaussianMixture", "GMMDenoiser", "GMMDenoiserOutput", "reference_sample"]

_F64 = torch.float64
SCHEDULES = ("vp", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
Scalar = float | torch.Tensor


class GaussianMixture:
    """Class-conditional Gaussian mixture in float64 with eigendecomposed covariances.

    Args:
        weights: ``(C, K)`` component weights per class, positive, each row summing to 1.
        means: ``(C, K, D)`` component means.
        eigvecs: ``(C, K, D, D)`` orthonormal eigenvectors (columns) of each covariance.
        eigvals: ``(C, K, D)`` positive eigenvalues, so ``Σ_ck = U diag(λ) Uᵀ``.
        shape: shape of one sample; ``prod(shape) == D``.

    The null label ``C`` (``== num_classes``) means unconditional: the mixture over all classes with prior ``1/C``.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        eigvecs: torch.Tensor,
        eigvals: torch.Tensor,
        shape: Sequence[int],
    ) -> None:
        shape = _check_shape(shape)
        weights, means = torch.as_tensor(weights, dtype=_F64), torch.as_tensor(means, dtype=_F64)
        eigvecs, eigvals = torch.as_tensor(eigvecs, dtype=_F64), torch.as_tensor(eigvals, dtype=_F64)
        dim = math.prod(shape)
        if weights.ndim != 2 or weights.numel() == 0:
            raise ValueError(
                f"weights must have shape (num_classes, components_per_class), got {tuple(weights.shape)}"
            )
        c, k = weights.shape
        expected = {"means": (c, k, dim), "eigvecs": (c, k, dim, dim), "eigvals": (c, k, dim)}
        for name, t in (("means", means), ("eigvecs", eigvecs), ("eigvals", eigvals)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]} for shape={shape}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
            raise ValueError("weights must be finite and > 0")
        if not torch.allclose(weights.sum(-1), torch.ones(c, dtype=_F64), atol=1e-6, rtol=0):
            raise ValueError("weights must sum to 1 over the components of each class")
        if not bool(torch.isfinite(eigvals).all()) or bool((eigvals <= 0).any()):
            raise ValueError("eigvals must be finite and > 0")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        gram = eigvecs.transpose(-1, -2) @ eigvecs
        if not torch.allclose(gram, torch.eye(dim, dtype=_F64).expand_as(gram), atol=1e-8, rtol=0):
            raise ValueError("eigvecs must be orthonormal (UᵀU = I) for every component")

        self.shape: tuple[int, ...] = shape
        self.num_classes, self.components_per_class, self.dim = c, k, dim
        self.weights = weights / weights.sum(-1, keepdim=True)
        # flattened components m = c * K + k
        self.means = means.reshape(c * k, dim)
        self.eigvecs = eigvecs.reshape(c * k, dim, dim)
        self.eigvals = eigvals.reshape(c * k, dim)
        # log-weight table over components: one row per label, the last row is the null (unconditional) label
        logw = torch.full((c + 1, c * k), -math.inf, dtype=_F64)
        for i in range(c):
            logw[i, i * k : (i + 1) * k] = self.weights[i].log()
        logw[c] = self.weights.log().reshape(-1) - math.log(c)
        self._logw = logw

    @classmethod
    def from_covariances(
        cls, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, shape: Sequence[int]
    ) -> GaussianMixture:
        """Build from full ``(C, K, D, D)`` SPD covariances (eigendecomposed with ``torch.linalg.eigh``)."""
        cov = torch.as_tensor(covariances, dtype=_F64)
        if cov.ndim != 4 or cov.shape[-1] != cov.shape[-2]:
            raise ValueError(f"covariances must have shape (C, K, D, D), got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-12, rtol=1e-10):
            raise ValueError("covariances must be symmetric")
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(weights, means, eigvecs, eigvals, shape)

    @classmethod
    def random(
        cls,
        num_classes: int = 3,
        components_per_class: int = 2,
        shape: Sequence[int] = (2, 4, 4),
        seed: int = 0,
        min_eigval: float = 0.01,
        max_eigval: float = 0.5,
        mean_scale: float = 1.0,
    ) -> GaussianMixture:
        """A deterministic well-conditioned mixture: means ``~ N(0, mean_scale² I)``, eigenvalues log-uniform in
        ``[min_eigval, max_eigval]``, Haar-random eigenvectors (QR of a Gaussian matrix), weights in ``[0.5, 1.5]``
        normalised per class."""
        for name, v in (("num_classes", num_classes), ("components_per_class", components_per_class)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 < min_eigval <= max_eigval or not math.isfinite(max_eigval):
            raise ValueError(f"need 0 < min_eigval <= max_eigval < inf, got {min_eigval}, {max_eigval}")
        if not mean_scale >= 0 or not math.isfinite(mean_scale):
            raise ValueError(f"mean_scale must be finite and >= 0, got {mean_scale}")
        shape = _check_shape(shape)
        dim, c, k = math.prod(shape), num_classes, components_per_class
        rng = np.random.default_rng(seed)
        weights = rng.uniform(0.5, 1.5, size=(c, k))
        weights /= weights.sum(-1, keepdims=True)
        means = mean_scale * rng.standard_normal((c, k, dim))
        q, r = np.linalg.qr(rng.standard_normal((c, k, dim, dim)))
        eigvecs = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]  # Haar: fix the QR sign ambiguity
        eigvals = np.exp(rng.uniform(math.log(min_eigval), math.log(max_eigval), size=(c, k, dim)))
        return cls(*(torch.from_numpy(a) for a in (weights, means, eigvecs, eigvals)), shape=shape)

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def null_label(self) -> int:
        """The label meaning "unconditional" (``num_classes``)."""
        return self.num_classes

    def component_class(self) -> torch.Tensor:
        """``(C*K,)`` class index of every flattened component (``means`` row order)."""
        return torch.arange(self.num_classes).repeat_interleave(self.components_per_class)

    def log_weights(self, class_labels: torch.Tensor | int | None, n: int) -> torch.Tensor:
        """``(n, C*K)`` log mixture weights for the labels (``-inf`` for components of other classes)."""
        return self._logw[self._labels(class_labels, n)]

    def mean(self, class_labels: torch.Tensor | int | None = None, n: int = 1) -> torch.Tensor:
        """``E[x0 | c]`` as ``(n, *shape)`` (``n`` is taken from the labels when they are a tensor)."""
        w = self.log_weights(class_labels, _n_from_labels(class_labels, n)).exp()
        return (w @ self.means).reshape(-1, *self.shape)

    def sample(
        self, class_labels: torch.Tensor | int | None = None, n: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``x0 ~ p(x0 | c)`` as ``(n, *shape)`` float64 (``n`` from the labels when they are a tensor)."""
        n = _n_from_labels(class_labels, n)
        logw = self.log_weights(class_labels, n)
        comp = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, dtype=_F64, generator=generator)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self.eigvecs[comp], self.eigvals[comp].sqrt() * z)
        return x.reshape(n, *self.shape)

    def log_prob(self, x0: torch.Tensor, class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """``log p(x0 | c)`` per sample, ``(N,)``."""
        return self.noisy_log_prob(x0, 1.0, 0.0, class_labels)

    def noisy_log_prob(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``log p_t(x | c) = logsumexp_k [log w_k + log N(x; α μ_k, α² Σ_k + σ² I)]`` per sample, ``(N,)``.

        Differentiable in ``x`` (plain torch ops), so ``-σ ∇_x`` of it is the exact ε prediction.
        """
        xf, a, s = self._inputs(x, alpha, sigma)
        logw = self.log_weights(class_labels, xf.shape[0])
        logn = self._component_terms(xf, a, s)[0]
        return torch.logsumexp(logw + logn, dim=-1)

    def posterior_mean(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``E[x0 | x_t = x, c]``, float64 with ``x``'s shape; ``x/α`` exactly where ``σ = 0``."""
        return self.posterior(x, alpha, sigma, class_labels)[0]

    def posterior_noise(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``E[ε | x_t = x, c] = -σ ∇_x log p_t(x | c)``, float64 with ``x``'s shape."""
        return self.posterior(x, alpha, sigma, class_labels)[1]

    def posterior(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar, class_labels: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[x0 | x], E[ε | x])`` for ``x = α x0 + σ ε``; ``α`` and ``σ`` are scalars or ``(N,)`` tensors."""
        xf, a, s = self._inputs(x, alpha, sigma)
        x0, eps = self._posterior(xf, a, s, self.log_weights(class_labels, xf.shape[0]))
        return x0.reshape(x.shape), eps.reshape(x.shape)

    # ----------------------------------------------------------------------------------------------------------------
    def _component_terms(
        self, xf: torch.Tensor, a: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample and component: log N(x; aμ, a²Σ + s²I), then, rescaled by ``c = max(a, s)`` so that
        ``a² λ + s²`` cannot underflow, ``z = Uᵀ(x' - a' μ)``, ``var = a'² λ + s'²``, ``a' = a/c``, ``s' = s/c``,
        ``x' = x/c``. Posterior means are invariant under the rescaling; the density gains the Jacobian -D log c."""
        c = torch.maximum(a, s)
        xf, a, s = xf / c[:, None], a / c, s / c
        diff = xf[:, None, :] - a[:, None, None] * self.means[None]  # (N, M, D)
        z = torch.einsum("mdj,nmd->nmj", self.eigvecs, diff)
        var = a[:, None, None] ** 2 * self.eigvals[None] + (s**2)[:, None, None]
        logn = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return logn - self.dim * c.log()[:, None], z, var, a, s, xf

    def _posterior(
        self, xf: torch.Tensor, a: torch.Tensor, s: torch.Tensor, logw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``(N, D)`` posterior means of x0 and ε (no input validation; used inside ODE right-hand sides)."""
        logn, z, var, a, s, xf = self._component_terms(xf, a, s)
        resp = torch.softmax(logw + logn, dim=-1)  # stable: softmax subtracts the max, i.e. logsumexp normalisation
        rz = resp[:, :, None] * z / var
        x0 = resp @ self.means + torch.einsum("mdj,nmj->nd", self.eigvecs, a[:, None, None] * self.eigvals * rz)
        eps = torch.einsum("mdj,nmj->nd", self.eigvecs, s[:, None, None] * rz)
        clean = s == 0
        if bool(clean.any()):  # σ = 0 (then a = 1 after rescaling): x0 = x/α exactly and E[ε | x] = 0
            x0 = torch.where(clean[:, None], xf, x0)
        return x0, eps

    def _inputs(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, {', '.join(map(str, self.shape))}), got {got}")
        n = x.shape[0]
        a, s = _per_sample(alpha, n, "alpha"), _per_sample(sigma, n, "sigma")
        if bool(((a == 0) & (s == 0)).any()):
            raise ValueError("alpha and sigma must not both be 0")
        return x.to(_F64).reshape(n, self.dim), a, s

    def _labels(self, class_labels: torch.Tensor | int | None, n: int) -> torch.Tensor:
        allowed = f"0..{self.num_classes - 1}, or the null label {self.num_classes} (unconditional)"
        if class_labels is None:
            return torch.full((n,), self.num_classes, dtype=torch.long)
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = torch.full((n,), class_labels, dtype=torch.long)
        if (
            not isinstance(class_labels, torch.Tensor)
            or class_labels.dtype.is_floating_point
            or (class_labels.dtype in (torch.bool, torch.complex64, torch.complex128))
        ):
            raise ValueError(f"class_labels must be None, an int or an integer tensor with values in {allowed}")
        labels = class_labels.reshape(-1).to("cpu", torch.long)
        if labels.numel() == 1 and n != 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"class_labels must have {n} entries (one per sample), got {labels.numel()}")
        if bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(f"class_labels must be in {allowed}, got {labels.unique().tolist()}")
        return labels


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if not out or any(d < 1 for d in out):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    return out


def _n_from_labels(class_labels: torch.Tensor | int | None, n: int) -> int:
    return class_labels.numel() if isinstance(class_labels, torch.Tensor) and class_labels.ndim > 0 else n


def _per_sample(v: Scalar, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=_F64).detach().to("cpu").reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} must be a scalar or have one value per sample ({n}), got {t.numel()} values")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return t


# --------------------------------------------------------------------------------------------------------------------
@dataclass
class GMMDenoiserOutput(BaseOutput):
    """Output of :class:`GMMDenoiser`: ``sample`` is the model prediction (ε, v, x0 or flow velocity)."""

    sample: torch.Tensor


class GMMDenoiser(torch.nn.Module):
    """The exact (Bayes-optimal) denoiser of a :class:`GaussianMixture`, usable as a diffusers backbone.

    Args:
        mixture: the data distribution.
        schedule: ``"vp"`` (discrete ``alphas_cumprod``, ``x_t = α x0 + σ ε``, ``α² + σ² = 1``) or ``"flow"``
            (``x_s = (1 - s) x0 + s ε`` with ``s = t / num_train_timesteps``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` (``α ε - σ x0``) or ``"sample"`` for vp;
            ``"flow_prediction"`` (``v = ε - x0``) for flow.
        alphas_cumprod: vp only, ``(T,)`` cumulative alphas; default: diffusers' ``DDPMScheduler`` default (linear
            betas 1e-4..0.02) with ``num_train_timesteps`` steps.
        num_train_timesteps: ``T`` for flow (and for the default vp schedule).

    VP timesteps may be fractional in ``[0, T-1]``: ``log ρ`` (``ρ = σ/α``) is interpolated linearly between integer
    timesteps, the inverse of diffusers' ``_sigma_to_t``. Flow timesteps lie in ``[0, T]``.
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        schedule: str = "vp",
        prediction_type: str | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if prediction_type is None:
            prediction_type = "epsilon" if schedule == "vp" else "flow_prediction"
        allowed = ("flow_prediction",) if schedule == "flow" else ("epsilon", "v_prediction", "sample")
        if prediction_type not in allowed:
            raise ValueError(
                f"prediction_type for schedule={schedule!r} must be one of {allowed}, got {prediction_type!r}"
            )
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, int)
            or num_train_timesteps < 2
        ):
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        self.mixture, self.schedule, self.prediction_type = mixture, schedule, prediction_type
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.float32), persistent=False)
        if schedule == "flow":
            if alphas_cumprod is not None:
                raise ValueError("alphas_cumprod is only used with schedule='vp'")
            self.num_train_timesteps = num_train_timesteps
            self.log_rhos: torch.Tensor | None = None
            return
        if alphas_cumprod is None:
            from diffusers import DDPMScheduler

            alphas_cumprod = DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", _F64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(((ac >= 0) & (ac <= 1)).all()) or not ac[0] > 0 or bool((ac[1:] > ac[:-1]).any()):
            raise ValueError("alphas_cumprod must lie in [0, 1], start > 0 and be non-increasing")
        self.num_train_timesteps = ac.numel()
        self.alphas_cumprod = ac
        self.log_rhos = 0.5 * (torch.log1p(-ac) - ac.log())  # log sqrt((1 - ᾱ) / ᾱ); +inf where ᾱ = 0

    @classmethod
    def from_scheduler_config(
        cls, mixture: GaussianMixture, config: Mapping[str, Any] | Any, prediction_type: str | None = None
    ) -> GMMDenoiser:
        """Match a diffusers scheduler config (or a scheduler instance).

        Flow matching (the config's ``num_train_timesteps``) for ``FlowMatch*`` classes (``_class_name``, or the
        instance's class; a bare config without either counts as flow when it has ``shift`` and no ``beta_schedule``)
        or for ``prediction_type == "flow_prediction"``; anything else is VP with
        ``DDPMScheduler.from_config(config).alphas_cumprod``. ``prediction_type`` defaults to the config's.
        """
        class_name = ""
        if not isinstance(config, Mapping):
            class_name = type(config).__name__
            config = getattr(config, "config", None)
            if not isinstance(config, Mapping):
                raise ValueError("config must be a scheduler config mapping or an object with a .config mapping")
        config = dict(config)
        class_name = str(config.get("_class_name") or class_name)
        if class_name:
            is_flow = class_name.startswith("FlowMatch")
        else:
            is_flow = "shift" in config and "beta_schedule" not in config
        if is_flow or config.get("prediction_type") == "flow_prediction":
            num_train_timesteps = int(config.get("num_train_timesteps", 1000))
            return cls(mixture, "flow", prediction_type or "flow_prediction", None, num_train_timesteps)
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(config)
        pred = prediction_type or config.get("prediction_type", "epsilon")
        return cls(mixture, "vp", pred, scheduler.alphas_cumprod)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def max_timestep(self) -> float:
        """Largest valid timestep: ``T - 1`` for vp, ``T`` for flow."""
        return float(self.num_train_timesteps - (1 if self.schedule == "vp" else 0))

    def rho(self, timestep: Scalar) -> torch.Tensor:
        """``ρ(t) = σ/α`` in float64: log-linear interpolation of ``sqrt((1-ᾱ_i)/ᾱ_i)`` (vp); ``s/(1-s)`` (flow)."""
        t = self._timesteps(timestep)
        if self.schedule == "flow":
            s = t / self.num_train_timesteps
            return s / (1 - s)  # inf at s = 1
        lr = self.log_rhos
        i0 = t.floor().clamp(0, self.num_train_timesteps - 1).long()
        i1 = (i0 + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - i0
        log_rho = torch.where(w == 0, lr[i0], (1 - w) * lr[i0] + w * lr[i1])
        return log_rho.exp()

    def alpha_sigma(self, timestep: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, σ)`` in float64 for timesteps: vp ``α = 1/sqrt(1 + ρ²)``, ``σ = ρ α``; flow ``(1 - s, s)``."""
        t = self._timesteps(timestep)
        if self.schedule == "flow":
            s = t / self.num_train_timesteps
            return 1 - s, s
        rho = self.rho(t)
        return torch.rsqrt(1 + rho**2), torch.rsqrt(1 + rho.pow(-2))  # both finite for ρ ∈ [0, inf]

    def predict(
        self, x: torch.Tensor, alpha: Scalar, sigma: Scalar, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The model output (this denoiser's ``prediction_type``) at noise level ``(α, σ)``, float64."""
        x0, eps = self.mixture.posterior(x, alpha, sigma, class_labels)
        n = x.shape[0]
        a = _per_sample(alpha, n, "alpha").reshape(-1, *([1] * (x.ndim - 1)))
        s = _per_sample(sigma, n, "sigma").reshape(-1, *([1] * (x.ndim - 1)))
        return _convert(self.prediction_type, x0, eps, a, s)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Scalar,
        class_labels: torch.Tensor | int | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> GMMDenoiserOutput | tuple[torch.Tensor]:
        """Predict at ``timestep`` (scalar or one per sample); the result has ``sample``'s shape, dtype and device.

        Extra keyword arguments (e.g. ``encoder_hidden_states``) are accepted and ignored.
        """
        alpha, sigma = self.alpha_sigma(self._broadcast(timestep, sample.shape[0]))
        out = self.predict(sample.detach().to("cpu", _F64), alpha, sigma, class_labels)
        out = out.to(sample.device, sample.dtype)
        return GMMDenoiserOutput(sample=out) if return_dict else (out,)

    def _broadcast(self, timestep: Scalar, n: int) -> torch.Tensor:
        t = torch.as_tensor(timestep).detach().to("cpu", _F64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"timestep must be a scalar or have one value per sample ({n}), got {t.numel()} values")
        return t

    def _timesteps(self, timestep: Scalar) -> torch.Tensor:
        t = torch.as_tensor(timestep).detach().to("cpu", _F64)
        hi = self.max_timestep
        tol = 1e-6 * hi
        if not bool(torch.isfinite(t).all()) or bool(((t < -tol) | (t > hi + tol)).any()):
            raise ValueError(f"timestep must lie in [0, {hi:g}] for schedule={self.schedule!r}")
        return t.clamp(0, hi)


def _convert(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return eps - x0  # flow_prediction: d/ds [(1 - s) x0 + s ε]


# --------------------------------------------------------------------------------------------------------------------
def reference_sample(
    denoiser: GMMDenoiser,
    x_T: torch.Tensor,
    class_labels: torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    t_start: float | None = None,
    t_end: float = 0.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``t_start`` to ``t_end`` with DOP853, in float64.

    VP: with ``y = x/α`` and ``ρ = σ/α`` the PF-ODE is exactly ``dy/dρ = ε̂(α y; α, σ)`` (the form exponential
    integrators discretise). It runs from ``ρ(t_start)`` (default ``t_start = T - 1``; ``x_T`` is the unscaled noisy
    sample there) to ``ρ(t_end)``, where ``t_end = 0`` means ``ρ = 0`` exactly, i.e. clean data, not ``ρ(0)``. The
    result is ``x = α(t_end) y``. Flow: ``dx/ds = v̂(x, s)`` from ``s = t_start/T`` (default 1) to ``t_end/T``.

    Classifier-free guidance is applied to ε (vp) or v (flow): ``out_u + g (out_c - out_u)`` with the null label
    for ``out_u``. ``class_labels=None`` samples unconditionally. Returns a float64 tensor with ``x_T``'s shape.
    """
    mix = denoiser.mixture
    x = x_T.detach().to("cpu", _F64)
    if x.ndim != len(mix.shape) + 1 or tuple(x.shape[1:]) != mix.shape:
        raise ValueError(f"x_T must have shape (N, {', '.join(map(str, mix.shape))}), got {tuple(x_T.shape)}")
    n = x.shape[0]
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    t_start = denoiser.max_timestep if t_start is None else float(t_start)
    t_end = float(t_end)
    logw_c = mix.log_weights(class_labels, n)
    logw_u = mix.log_weights(None, n)
    guided = class_labels is not None and guidance_scale != 1.0

    def field(xf: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x0, eps = mix._posterior(xf, a, s, logw_c)
        out = eps if denoiser.schedule == "vp" else eps - x0
        if guided:
            x0u, epsu = mix._posterior(xf, a, s, logw_u)
            out_u = epsu if denoiser.schedule == "vp" else epsu - x0u
            out = out_u + guidance_scale * (out - out_u)
        return out

    ones = torch.ones(n, dtype=_F64)
    if denoiser.schedule == "vp":
        rho0 = float(denoiser.rho(t_start))
        rho1 = 0.0 if t_end == 0 else float(denoiser.rho(t_end))
        if not math.isfinite(rho0):
            raise ValueError("rho(t_start) is infinite (zero terminal SNR): pick a smaller t_start")

        def rhs(rho: float, y: np.ndarray) -> np.ndarray:
            a = 1.0 / math.sqrt(1.0 + rho * rho)
            yt = torch.from_numpy(y).reshape(n, mix.dim)
            return field(a * yt, a * ones, rho * a * ones).reshape(-1).numpy()

        a0, a1 = 1.0 / math.sqrt(1.0 + rho0 * rho0), 1.0 / math.sqrt(1.0 + rho1 * rho1)
        y_end = _solve(rhs, rho0, rho1, (x / a0).reshape(-1).numpy(), rtol, atol)
        return torch.from_numpy(a1 * y_end).reshape(x_T.shape)

    s0, s1 = t_start / denoiser.num_train_timesteps, t_end / denoiser.num_train_timesteps
    denoiser._timesteps(torch.tensor([t_start, t_end]))  # range check

    def rhs_flow(s: float, xv: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(xv).reshape(n, mix.dim)
        return field(xt, (1.0 - s) * ones, s * ones).reshape(-1).numpy()

    return torch.from_numpy(_solve(rhs_flow, s0, s1, x.reshape(-1).numpy(), rtol, atol)).reshape(x_T.shape)


def _solve(rhs: Any, t0: float, t1: float, y0: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """DOP853 from ``t0`` to ``t1``. torch runs single-threaded meanwhile (restored after): the right-hand side is
    thousands of tiny ops, for which intra-op threads only add overhead (50x on a loaded 2-core machine)."""
    if t0 == t1:
        return y0.copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sol = solve_ivp(rhs, (t0, t1), y0, method="DOP853", rtol=rtol, atol=atol)
    finally:
        torch.set_num_threads(threads)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return sol.y[:, -1]
