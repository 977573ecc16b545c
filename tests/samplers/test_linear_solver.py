"""samplers.linear_solver: every one-evaluation-per-step solver as a coefficient table, and the table step."""

from __future__ import annotations

import math

import pytest
import torch

from samplers import DCSolverScheduler, DEISScheduler, run_sampler
from samplers.linear_solver import check_table, solver_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")
VP = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
FLOW = {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "shift": 3.0}
CONFIGS = [
    (DEISScheduler, VP, {}),
    (DEISScheduler, VP, {"deis_order": 3, "deis_lower_order": False}),
    (DEISScheduler, VP, {"deis_method": "rhoab", "deis_order": 2}),
    (DEISScheduler, VP, {"deis_method": "ipndm", "prediction_type": "v_prediction"}),
    (DCSolverScheduler, VP, {}),
    (DCSolverScheduler, VP, {"solver_order": 3, "solver_type": "bh1", "disable_corrector": [0]}),
    (DCSolverScheduler, VP, {"dc_ratios": [1.0, 1.0, 0.93, 1.08, 1.12, 0.97]}),
    (DCSolverScheduler, VP, {"thresholding": True, "prediction_type": "sample"}),
    (DCSolverScheduler, FLOW, {}),
    (DEISScheduler, FLOW, {"deis_order": 2}),
]


def _denoise(x: torch.Tensor, t) -> torch.Tensor:
    """Any nonlinear model output will do: the table reproduces the solver algebraically."""
    return torch.tanh(1.3 * x) * (0.5 + float(t) / 1000.0) + 0.1 * x


@pytest.mark.parametrize("cls, base, opts", CONFIGS)
def test_the_table_reproduces_the_solver(cls, base, opts):
    """The rows read off by the probe, put back into the config, give the solver's own samples (float64)."""
    x = 1.7 * torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own = cls.from_config(base, **opts)
    expected = run_sampler(_denoise, own, x, 6)
    rows = solver_coefficients(own, 6)
    assert [len(r) for r in rows] == [i + 2 for i in range(6)]
    tabled = cls.from_config(own.config, fitted_coefficients=rows,
                             fitted_timesteps=[float(t) for t in own.timesteps.double()])
    tabled.set_timesteps(6)
    assert tabled._fitted == rows  # the table path is what runs
    got = run_sampler(_denoise, tabled, x, 6)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_ddim_rows_are_the_closed_form():
    """DEIS tAB with a degree-0 polynomial is DDIM: x_{i+1} = (σ_{i+1}/σ_i) x_i + (α_{i+1} - α_i σ_{i+1}/σ_i) x̂0_i,
    and nothing else."""
    sched = DEISScheduler.from_config(VP, deis_order=0)
    rows = solver_coefficients(sched, 5)
    sched.set_timesteps(5)
    al, si = sched._alphas + [1.0], sched._sigmas_f + [0.0]
    for i, row in enumerate(rows):
        a = si[i + 1] / si[i]
        assert row[0] == pytest.approx(a, abs=1e-13)
        assert row[-1] == pytest.approx(al[i + 1] - al[i] * a, abs=1e-13)
        assert all(abs(v) < 1e-13 for v in row[1:-1])


def test_a_table_runs_only_from_the_start_of_its_own_timesteps(tmp_path):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    own = DCSolverScheduler.from_config(VP)
    own.set_timesteps(5)
    ts = [float(t) for t in own.timesteps.double()]
    rows = [[r[0] * 0.9] + r[1:] for r in solver_coefficients(own, 5)]  # a table that differs from the solver
    sched = DCSolverScheduler.from_config(VP, fitted_coefficients=rows, fitted_timesteps=ts)
    plain = run_sampler(_denoise, DCSolverScheduler.from_config(VP), x, 5)
    tabled = run_sampler(_denoise, sched, x, 5)
    assert (tabled - plain).abs().max() > 1e-3
    # other step counts and other timesteps: the solver's own update
    assert torch.equal(run_sampler(_denoise, sched, x, 6), run_sampler(_denoise, DCSolverScheduler.from_config(VP),
                                                                        x, 6))
    other = [999.0, 700.0, 450.0, 200.0, 40.0]
    assert torch.equal(run_sampler(_denoise, sched, x, timesteps=other),
                       run_sampler(_denoise, DCSolverScheduler.from_config(VP), x, timesteps=other))
    # a run that starts later (img2img) uses the solver: the table was fitted from x_T
    outs = []
    for s in (sched, DCSolverScheduler.from_config(VP)):
        s.set_timesteps(5)
        s.set_begin_index(2)
        y = x.clone()
        for t in s.timesteps[2:]:
            y = s.step(_denoise(y, t), t, y).prev_sample
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    # the table survives save_pretrained / from_pretrained and gives the same samples
    sched.save_pretrained(tmp_path)
    again = DCSolverScheduler.from_pretrained(tmp_path)
    assert again.config.fitted_coefficients == rows
    assert torch.equal(run_sampler(_denoise, again, x, 5), tabled)


@pytest.mark.parametrize("coefs, ts, match", [
    ([[1.0, 0.5]], None, "set both or neither"),
    (None, [999.0], "set both or neither"),
    ([[1.0, 0.5]], [999.0, 500.0], "one row per timestep"),
    ([[1.0, 0.5], [1.0, 0.5]], [999.0, 500.0], "row 1 must hold 3 numbers"),
    ([[1.0, math.nan]], [999.0], "finite"),
    ([[1.0, 0.2], [0.5, 0.1, 0.2]], [500.0, 999.0], "strictly decreasing"),
    ("rows", [999.0], "list of rows"),
])
def test_malformed_tables_are_refused(coefs, ts, match):
    with pytest.raises(ValueError, match=match):
        check_table(coefs, ts)
    with pytest.raises(ValueError, match=match):
        DCSolverScheduler.from_config(VP, fitted_coefficients=coefs, fitted_timesteps=ts)


def test_runge_kutta_stages_take_no_table():
    with pytest.raises(ValueError, match="rhork"):
        DEISScheduler.from_config(VP, deis_method="rhork", deis_order=2, fitted_coefficients=[[1.0, 0.0]],
                                  fitted_timesteps=[999.0])
    with pytest.raises(ValueError, match="one model evaluation per step"):
        solver_coefficients(DEISScheduler.from_config(VP, deis_method="rhork", deis_order=2), 4)
