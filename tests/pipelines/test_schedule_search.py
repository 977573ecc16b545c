"""pipelines.search_schedule / fit_sampler / use_sampler(fit=True) on the bundled DiT (small search settings)."""

from __future__ import annotations

import pytest
import torch

from pipelines import DigitsPipeline, fit_sampler, search_schedule, use_sampler
from samplers import CoefficientFitResult, DCSolverScheduler, DEISScheduler

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"grid_points": 12, "substeps": 2, "refine_rounds": 1}


@pytest.fixture
def pipe():
    p = DigitsPipeline.from_pretrained("assets/digits-dit")
    p.set_progress_bar_config(disable=True)
    return p


def test_search_schedule_on_the_pipeline_scheduler(pipe, tmp_path):
    use_sampler(pipe, "dc-solver")
    res = search_schedule(pipe, [1, 2, 3], 4, 2.0, num_latents=6, progress=False, **SMALL)
    assert res.search_error < res.default_search_error  # the search never returns a worse schedule
    stored = pipe.scheduler.config.searched_timesteps
    assert (stored == res.timesteps) if res.accepted else stored is None
    pipe.save_pretrained(tmp_path)
    again = DigitsPipeline.from_pretrained(tmp_path)
    assert again.scheduler.config.searched_timesteps == stored
    with pytest.raises(ValueError, match="text prompts are not supported yet"):
        search_schedule(pipe, ["a cat"], 4)
    with pytest.raises(ValueError, match="num_latents must be an int >= 2"):
        search_schedule(pipe, [1], 4, num_latents=1)


def test_fit_sampler_quantization_aware(pipe):
    """Searched on a perturbed copy of the backbone against the original (the quantization-aware set-up)."""
    ref = DigitsPipeline.from_pretrained("assets/digits-dit")
    with torch.no_grad():
        for p in pipe.backbone.parameters():
            p.mul_(1.01)
    out = fit_sampler(pipe, [0, 5], 4, 2.0, reference_pipe=ref, num_latents=6, iters=2, fine_steps=40,
                      progress=False, **SMALL)
    assert isinstance(pipe.scheduler, DCSolverScheduler)
    assert pipe.scheduler.config.dc_ratios == out["ratios"] and len(out["ratios"]) == 4
    assert out["schedule"].search_error <= out["schedule"].default_search_error
    fit = out["coefficients"]  # fitted last, on the schedule and ratios found
    assert isinstance(fit, CoefficientFitResult)
    assert fit.timesteps == [float(t) for t in pipe.scheduler.timesteps.double()]
    stored = pipe.scheduler.config.fitted_coefficients
    assert (stored == fit.coefficients) if fit.accepted else stored is None


def test_fit_sampler_without_coefficients(pipe):
    out = fit_sampler(pipe, [3], 3, 2.0, num_latents=4, ratios=False, coefficients=False, fine_steps=12,
                      progress=False, **SMALL)
    assert out["coefficients"] is None and out["ratios"] == [1.0] * 3
    assert pipe.scheduler.config.fitted_coefficients is None


def test_fit_sampler_on_the_found_schedule_only(pipe):
    """grids=None, node_rounds=0: the coefficients are fitted on the schedule in use alone, which the scheduler
    keeps."""
    out = fit_sampler(pipe, [3, 4], 3, 2.0, num_latents=6, ratios=False, grids=None, node_rounds=0, fine_steps=12,
                      progress=False, **SMALL)
    fit = out["coefficients"]
    assert len(fit.grid_errors) == 1 and fit.grid_errors[0][0] == fit.timesteps
    assert fit.timesteps == [float(t) for t in pipe.scheduler.timesteps.double()]


def test_use_sampler_deis_fit(pipe):
    use_sampler(pipe, "deis", fit=True, fit_steps=4, fit_latents=2, fit_guidance_scale=2.0)
    assert isinstance(pipe.scheduler, DEISScheduler)
    chosen = (pipe.scheduler.config.deis_method, pipe.scheduler.config.deis_order, pipe.scheduler.config.time_grid)
    assert chosen[0] in ("tab", "rhoab", "ipndm")
    with pytest.raises(ValueError, match="fit=True .* apply to 'deis' only"):
        use_sampler(pipe, "dc-solver", fit=True)
    with pytest.raises(ValueError, match=r"fit=True chooses \['time_grid'\] itself"):
        use_sampler(pipe, "deis", fit=True, time_grid="rho")
    with pytest.raises(ValueError, match=r"\['fit_steps'\] need fit=True"):
        use_sampler(pipe, "deis", fit_steps=3)
    with pytest.raises(TypeError, match="fit must be True or False"):
        use_sampler(pipe, "deis", fit="yes")


def test_fit_sampler_refines_the_table_when_asked(pipe):
    """``refine_iters`` reaches the fit: here the refined table lowers the search error but not the held-out one,
    so the sequential fit stays, the same table as without the refinement."""
    tables = []
    for iters in (4, 0):
        p = DigitsPipeline.from_pretrained("assets/digits-dit") if iters == 0 else pipe
        out = fit_sampler(p, [2, 7], 3, 2.0, num_latents=8, ratios=False, grids=None, node_rounds=0, fine_steps=24,
                          refine_iters=iters, progress=False, **SMALL)
        tables.append((out["coefficients"], p.scheduler.config.fitted_coefficients))
    (fit, stored), (plain, plain_stored) = tables
    assert fit.accepted and not fit.refined
    assert fit.refine_reason.startswith("refined table is worse than the sequential fit on 4 held-out latents")
    assert stored == plain_stored == plain.coefficients and fit.search_error == plain.search_error
