"""The diffusers scheduler contract (what diffusers' ``SchedulerCommonTest`` checks), for both schedulers and every
supported option, plus the defects that suite found (issue 17). Written for dmq; see docs/samplers.md."""

from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

from samplers import DCSolverScheduler, DEISScheduler
from samplers.thresholding import dynamic_threshold
from samplers.variants import DC_ONLY, DEIS_ONLY, SHARED

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(DEISScheduler, k, v) for k, v in {**SHARED, **DEIS_ONLY}.items()] + [
    (DCSolverScheduler, k, v) for k, v in {**SHARED, **DC_ONLY}.items()
]
IDS = [f"{c.__name__[:4]}-{k}" for c, k, _ in CASES]


def _sample(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _run(sched, n: int, x: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A full loop with a fixed linear 'model' (output = 0.1 x + 0.05): deterministic, cheap, non-trivial."""
    sched.set_timesteps(n)
    states = []
    for t in sched.timesteps:
        out = sched.step(0.1 * x + 0.05, t, x, return_dict=return_dict)
        x = out.prev_sample if return_dict else out[0]
        states.append(x)
    return x, states


@pytest.mark.parametrize(("cls", "name", "kw"), CASES, ids=IDS)
def test_save_load_round_trip_and_identical_steps(tmp_path, cls, name, kw):
    """Config equal after save_pretrained/from_pretrained; the reloaded scheduler steps identically, and the tuple and
    dataclass outputs agree."""
    sched = cls(**kw)
    sched.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert {k: v for k, v in sched.config.items() if k != "_use_default_values"} == dict(again.config)
    assert json.loads(json.dumps(dict(sched.config)))  # plain JSON
    n = 5
    a, states = _run(sched, n, _sample())
    b, _ = _run(again, n, _sample(), return_dict=False)
    assert torch.isfinite(a).all() and len(states) == n * sched.order
    assert torch.equal(a, b)
    # from_config of our own config keeps its meaning (no re-interpretation of flow/VP)
    assert type(sched).from_config(sched.config).schedule.kind == sched.schedule.kind


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
def test_public_api_and_no_kwargs(cls):
    sched = cls()
    assert sched.init_noise_sigma == 1.0
    x = _sample()
    assert torch.equal(sched.scale_model_input(x, 0.0), x)
    assert "kwargs" not in inspect.signature(cls.__init__).parameters and not cls._deprecated_kwargs
    sched.register_to_config(extra_key=5)
    with pytest.raises(AttributeError, match=f"'{cls.__name__}' object has no attribute 'nope'"):
        sched.nope  # noqa: B018


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
def test_add_noise_closed_form_at_grid_points(cls):
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, time_grid="spacing")
    sched.set_timesteps(10)
    x0, eps = _sample(0), _sample(1)
    t = sched.timesteps[3][None]
    ac = sched.alphas_cumprod[int(t)].double()
    want = ac.sqrt() * x0.double() + (1 - ac).sqrt() * eps.double()
    torch.testing.assert_close(sched.add_noise(x0.double(), eps.double(), t), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
def test_betas_attribute_and_trained_betas(tmp_path, cls):
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = cls.from_config(ref.config)
    assert torch.equal(sched.betas, ref.betas) and torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)
    trained = cls(trained_betas=[0.1, 0.3, 0.5])
    trained.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.betas.tolist() == trained.betas.tolist() == torch.tensor([0.1, 0.3, 0.5]).tolist()
    assert len(again) == 3  # the trained betas set the number of train steps
    with pytest.raises(ValueError, match="trained_betas and rescale_betas_zero_snr describe a VP schedule"):
        cls(trained_betas=[0.1, 0.3], prediction_type="flow_prediction")


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
def test_compatibles_round_trip(cls):
    """from_config into every compatible diffusers scheduler and back leaves our config unchanged."""
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    for name in sched._compatibles:
        other_cls = getattr(diffusers, name)
        try:
            other = other_cls.from_config(sched.config)
        except ImportError:  # DPMSolverSDEScheduler needs torchsde, an optional diffusers dependency
            continue
        back = cls.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in sched.config} == dict(sched.config), name


# ---------------------------------------------------------------------------------------------------------------------
# the defects listed in issue 17


@pytest.mark.parametrize("solver_type", ["midpoint", "heun", "logrho"])
def test_dc_reads_dpm_and_deis_solver_types_as_bh2(solver_type):
    """PixArt ships DPMSolverMultistepScheduler(solver_type='midpoint'); DEIS configs have 'logrho'."""
    config = {**diffusers.DPMSolverMultistepScheduler().config, "solver_type": solver_type}
    dc = DCSolverScheduler.from_config(config)
    assert dc.config.solver_type == "bh2"
    plain = DCSolverScheduler()
    assert torch.equal(_run(dc, 6, _sample())[0], _run(plain, 6, _sample())[0])
    with pytest.raises(ValueError, match=r"solver_type must be one of \('bh1', 'bh2'\).*got 'bh3'"):
        DCSolverScheduler(solver_type="bh3")


def test_flow_sigmas_need_flow_prediction():
    msg = "use_flow_sigmas=True needs prediction_type='flow_prediction', got 'epsilon'"
    with pytest.raises(ValueError, match=msg):
        DEISScheduler(use_flow_sigmas=True, prediction_type="epsilon")
    # a foreign (DPM-Solver) config with flow sigmas is read as flow, and stays flow across a round trip
    src = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=3.0)
    ours = DEISScheduler.from_config(src.config)
    assert ours.is_flow and DEISScheduler.from_config(ours.config).is_flow
    vp = DEISScheduler(prediction_type="v_prediction")
    assert not DEISScheduler.from_config(vp.config).is_flow


def test_disable_corrector_tuple_round_trips_as_list(tmp_path):
    sched = DCSolverScheduler(disable_corrector=(0,))
    assert sched.config.disable_corrector == [0]
    assert DCSolverScheduler().config.disable_corrector == []
    sched.save_config(tmp_path)
    assert DCSolverScheduler.from_pretrained(tmp_path).config.disable_corrector == [0]
    with pytest.raises(ValueError, match="disable_corrector must hold integers >= 0"):
        DCSolverScheduler(disable_corrector=[-1])
    with pytest.raises(TypeError, match="disable_corrector must be a list of step indices"):
        DCSolverScheduler(disable_corrector="0")


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_every_train_step_with_spacing(cls, spacing):
    sched = cls(num_train_timesteps=50, time_grid="spacing", timestep_spacing=spacing)
    for n in (49, 50, 60):
        sched.set_timesteps(n)
        ts = sched.timesteps.double()
        assert len(ts) == n and bool((ts.diff() < 0).all()) and 0 <= float(ts.min()) and float(ts.max()) <= 49


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dc_on_flow_is_finite_and_exact_for_linear_velocity(order):
    """σ = 1 at the first point (λ = -∞) must not enter the order-3 polynomial (it gave all-NaN samples). Data = a
    point mass at 0: x = σ ε, the exact velocity is v = ε - x0 = x/σ, every x̂0 is 0, and so is the final sample."""
    sched = DCSolverScheduler(prediction_type="flow_prediction", solver_order=order, shift=3.0)
    sched.set_timesteps(6)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in sched.timesteps:
        sigma = float(t) / 1000
        x = sched.step(x / sigma, t, x).prev_sample  # exact velocity for a point mass at 0: x = σ ε, v = ε
    assert torch.isfinite(x).all() and x.abs().max() < 1e-12


def test_pipeline_with_dc_solver_saves_and_loads(tmp_path):
    from pipelines import use_sampler
    from pipelines.digits_pipeline import DigitsPipeline

    pipe = DigitsPipeline.from_pretrained("assets/digits-dit")
    use_sampler(pipe, "dc-solver", ratios=[1.0, 1.1, 0.9, 1.0])
    pipe.save_pretrained(tmp_path)
    again = DigitsPipeline.from_pretrained(tmp_path)
    assert isinstance(again.scheduler, DCSolverScheduler)
    assert again.scheduler.config.dc_ratios == [1.0, 1.1, 0.9, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# options diffusers has and we now have


def test_dynamic_threshold_closed_form():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.4, 0.1]], dtype=torch.float64)
    out = dynamic_threshold(x0, 0.5, 10.0)
    s0 = float(torch.quantile(x0[0].abs(), 0.5))  # 1.25 > 1: clamp then rescale
    torch.testing.assert_close(out[0], x0[0].clamp(-s0, s0) / s0)
    torch.testing.assert_close(out[1], x0[1])  # quantile < 1: s = 1, unchanged
    assert float(dynamic_threshold(x0, 0.99, 1.1).abs().max()) <= 1.0


@pytest.mark.parametrize("cls", [DEISScheduler, DCSolverScheduler])
def test_thresholding_bounds_the_final_sample(cls):
    """The last step returns x̂0 (σ = 0); with thresholding its pixels stay in [-1, 1] although the model's are ±3."""
    kw = {"deis_order": 0} if cls is DEISScheduler else {"solver_order": 1, "corrector": False}
    sched = cls(thresholding=True, sample_max_value=5.0, dynamic_thresholding_ratio=0.9, prediction_type="sample",
                **kw)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    big = 3 * torch.sign(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    sched.set_timesteps(4)
    for t in sched.timesteps:
        x = sched.step(big, t, x).prev_sample
    assert float(x.abs().max()) <= 1.0 + 1e-6 and float(x.abs().max()) > 0.99


@pytest.mark.parametrize(("flag", "cls_name"), [("use_karras_sigmas", "DPMSolverMultistepScheduler"),
                                                ("use_exponential_sigmas", "DPMSolverMultistepScheduler"),
                                                ("use_beta_sigmas", "DPMSolverMultistepScheduler")])
def test_sigma_grids_match_diffusers(flag, cls_name):
    ref = getattr(diffusers, cls_name)(**{flag: True}, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, final_sigmas_type="zero")
    ref.set_timesteps(12)
    ours = DEISScheduler.from_config(ref.config)
    ours.set_timesteps(12)
    np.testing.assert_allclose(ours.sigmas[:-1].numpy(), ref.sigmas[:-1].numpy(), rtol=2e-4)


def test_sigma_bounds_set_the_grid_ends_and_are_validated():
    sched = DEISScheduler(use_karras_sigmas=True, sigma_min=0.1, sigma_max=20.0)
    sched.set_timesteps(7)
    np.testing.assert_allclose(sched.sigmas[[0, 6]].numpy(), [20.0, 0.1], rtol=1e-5)
    with pytest.raises(ValueError, match=r"sigma_max must be None or a ρ = σ/α in \[0.0100013, 157.407\], got 500"):
        DEISScheduler(use_karras_sigmas=True, sigma_max=500)
    with pytest.raises(ValueError, match="sigma_min/sigma_max bound the 'rho', 'log_rho' and 'beta' grids"):
        DEISScheduler(sigma_min=0.1)
    with pytest.raises(ValueError, match=r"at most one of .* True, got \['use_karras_sigmas', 'use_beta_sigmas'\]"):
        DEISScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
