"""samplers.FineTeacher: one fine DDIM solve read at any timestep, against the exact PF-ODE of Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samplers import DCSolverScheduler, FineTeacher
from samplers.schedule_search import fine_trajectory

from .test_coefficient_fit import VP, _gaussian, _mse

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    sched = DCSolverScheduler.from_config(VP)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den, states = _gaussian(sched, torch.linspace(0.1, 0.9, 6))
    sched.set_timesteps(5)
    nodes = [float(t) for t in sched.timesteps.double()]
    return sched, x, den, states(x, 5), nodes


def test_states_converge_at_first_order_to_the_exact_ode():
    """Off-grid node states and the final sample: doubling the steps quarters the squared error (DDIM is first
    order), and at 400 steps every squared error is below 1e-4 of the state's mean square."""
    sched, x, den, exact, nodes = _problem()
    errs = {}
    for steps in (200, 400):
        t = FineTeacher(den, sched.schedule, sched.convert_output, x, nodes[0], steps)
        errs[steps] = [_mse(t.state(n), e) for n, e in zip(nodes[1:], exact)] + [_mse(t.final, exact[-1])]
    for coarse, fine in zip(errs[200], errs[400]):
        assert 3.0 < coarse / fine < 5.0
    for err, e in zip(errs[400], exact):
        assert err < 1e-4 * float(e.pow(2).mean())


def test_grid_states_are_those_of_the_fine_trajectory():
    sched, x, den, _, nodes = _problem()
    t = FineTeacher(den, sched.schedule, "epsilon", x, nodes[0], 50)
    states, _, final = fine_trajectory(den, sched.schedule, "epsilon", x, t.grid, 1)
    for g, s in zip(t.grid[1:], states[1:]):
        torch.testing.assert_close(t.state(float(g)), s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.final, final, rtol=1e-12, atol=1e-12)
    assert torch.equal(t.state(float(t.grid[0])), x)


def test_a_small_memory_budget_recomputes_the_same_bits():
    """With room for a few states only, a node's state is recomputed from the kept state above it: the same
    numbers, at most ``stride`` evaluations a node; with room for all, a node costs none. Recomputed node states
    are remembered, as many as a quarter of the budget holds (two here), the least recently used dropped first."""
    sched, x, den, _, nodes = _problem()
    full = FineTeacher(den, sched.schedule, sched.convert_output, x, nodes[0], 64)
    small = FineTeacher(den, sched.schedule, sched.convert_output, x, nodes[0], 64, memory_bytes=8 * x.numel() * 8)
    assert full.stride == 1 and small.stride == 8 and full.evaluations == small.evaluations == 64
    for n in nodes[1:]:
        before = small.evaluations
        assert torch.equal(small.state(n), full.state(n))
        assert 1 <= small.evaluations - before <= small.stride
        assert small.state(n) is small.state(n)
    assert full.evaluations == 64
    assert torch.equal(small.final, full.final)
    before = small.evaluations
    small.state(nodes[-1])
    assert small.evaluations == before  # still remembered
    small.state(nodes[1])
    assert small.evaluations > before  # dropped: recomputed


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 1}, "steps"), ({"steps": 2.5}, "steps"), ({"memory_bytes": 0}, "memory_bytes"),
])
def test_bad_arguments_are_refused(kwargs, match):
    sched, x, den, _, nodes = _problem()
    with pytest.raises(ValueError, match=match):
        FineTeacher(den, sched.schedule, "epsilon", x, nodes[0], **{"steps": 20, **kwargs})


@pytest.mark.parametrize("t", [1000.0, -1.0, float("nan"), np.inf])
def test_times_outside_the_solve_are_refused(t):
    sched, x, den, _, nodes = _problem()
    teacher = FineTeacher(den, sched.schedule, "epsilon", x, nodes[0], 20)
    with pytest.raises(ValueError, match="t must be in"):
        teacher.state(t)


def test_a_model_with_trainable_weights_leaves_no_graph():
    """The solve keeps ``fine_steps`` states: under grad each would hold the whole tape back to ``x_T``."""
    sched, x, den, _, nodes = _problem()
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    teacher = FineTeacher(lambda y, t: w * den(y, t), sched.schedule, "epsilon", x, nodes[0], 20)
    assert not teacher.final.requires_grad and not teacher.state(nodes[2]).requires_grad
