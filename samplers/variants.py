"""The configuration variants of the dmq schedulers that the diffusers scheduler contract runs over, as data.

``tests/samplers/test_contract.py`` and ``scripts/run_diffusers_scheduler_suite.py`` (diffusers' own
``SchedulerCommonTest``) both build one case per entry: ``SHARED`` for both schedulers, plus ``DEIS_ONLY`` for
:class:`~samplers.DEISScheduler` and ``DC_ONLY`` for :class:`~samplers.DCSolverScheduler`.
"""

from __future__ import annotations

from .linear_solver import solver_coefficients
from .scheduling_dc import DCSolverScheduler

# a 5-step schedule with a coefficient table on it (UniPC's own rows on those nodes, in the default VP schedule)
_FITTED_TIMESTEPS = [990.0, 700.0, 400.0, 150.0, 20.0]
_FITTED_ROWS = solver_coefficients(DCSolverScheduler(searched_timesteps=_FITTED_TIMESTEPS), 5)

SHARED: dict[str, dict] = {
    "vp": {},
    "flow": {"prediction_type": "flow_prediction", "shift": 3.0},
    "flow-sigmas": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    "zero-snr": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "time_grid": "spacing",
                 "timestep_spacing": "trailing"},
    "thresholding": {"thresholding": True, "sample_max_value": 1.5},
    "karras": {"use_karras_sigmas": True, "sigma_min": 0.02, "sigma_max": 50.0},
    "beta-sigmas": {"use_beta_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sample": {"prediction_type": "sample", "time_grid": "rho"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "time_grid": "log_rho"},
    "searched": {"searched_timesteps": [990.0, 800.0, 600.0, 450.0, 300.0, 200.0, 120.0, 60.0, 20.0, 5.0]},
    "fitted": {"searched_timesteps": _FITTED_TIMESTEPS, "fitted_timesteps": _FITTED_TIMESTEPS,
               "fitted_coefficients": _FITTED_ROWS},
}
DEIS_ONLY: dict[str, dict] = {"rhork": {"deis_method": "rhork", "deis_order": 2}, "ipndm": {"deis_method": "ipndm"}}
DC_ONLY: dict[str, dict] = {
    "midpoint": {"solver_type": "midpoint"},
    "logrho": {"solver_type": "logrho"},
    "order3-flow": {"solver_order": 3, "prediction_type": "flow_prediction"},
    "disable-tuple": {"disable_corrector": (0, 2)},
    "bh1-order3": {"solver_type": "bh1", "solver_order": 3},
}
