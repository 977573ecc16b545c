"""samplers: fast diffusion samplers as drop-in diffusers schedulers.

``DEISScheduler`` implements DEIS (Zhang & Chen, ICLR 2023): tAB, ρAB, ρRK and iPNDM. The math is in
``samplers.deis`` (update plans), ``samplers.quadrature``, ``samplers.grids`` and ``samplers.schedules``.
``DCSolverScheduler`` implements DC-Solver (Zhao et al., ECCV 2024): UniPC (``samplers.unipc``) with dynamic
compensation, its ratio search (``samplers.dc``) and cascade polynomial regression (``samplers.cpr``).
``search_schedule`` (``samplers.schedule_search``) fits the timesteps of a schedule to a model (GITS + LD3-style),
and ``fit_coefficients`` (``samplers.coefficient_fit``) the solver's coefficients on it (S4S-style least squares),
against one fine teacher shared by every schedule (``samplers.fine_teacher``).
"""

# A pipeline folder names its scheduler ["samplers", "DCSolverScheduler"] in model_index.json; diffusers loads such a
# component only if the named package also exposes the loadable base class, SchedulerMixin.
from diffusers import SchedulerMixin  # noqa: F401

from .coefficient_fit import CoefficientFitResult, fit_coefficients
from .cpr import CascadePolynomialRegression
from .dc import ddim_reference, search_dc_ratios
from .fine_teacher import FineTeacher
from .schedule_search import ScheduleSearchResult, run_sampler, search_schedule, searched_timesteps_kwargs
from .scheduling_dc import DCSolverScheduler
from .scheduling_deis import DEISScheduler, DEISSchedulerOutput

__all__ = [
    "CascadePolynomialRegression",
    "CoefficientFitResult",
    "DCSolverScheduler",
    "DEISScheduler",
    "DEISSchedulerOutput",
    "FineTeacher",
    "ScheduleSearchResult",
    "ddim_reference",
    "fit_coefficients",
    "run_sampler",
    "search_dc_ratios",
    "search_schedule",
    "searched_timesteps_kwargs",
]
