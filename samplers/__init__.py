"""samplers: fast diffusion samplers as drop-in diffusers schedulers.

``DEISScheduler`` implements DEIS (Zhang & Chen, ICLR 2023): tAB, ρAB, ρRK and iPNDM. The math is in
``samplers.deis`` (update plans), ``samplers.quadrature``, ``samplers.grids`` and ``samplers.schedules``.
``DCSolverScheduler`` implements DC-Solver (Zhao et al., ECCV 2024): UniPC (``samplers.unipc``) with dynamic
compensation, its ratio search (``samplers.dc``) and cascade polynomial regression (``samplers.cpr``).
"""

# A pipeline folder names its scheduler ["samplers", "DCSolverScheduler"] in model_index.json; diffusers loads such a
# component only if the named package also exposes the loadable base class, SchedulerMixin.
from diffusers import SchedulerMixin  # noqa: F401

from .cpr import CascadePolynomialRegression
from .dc import ddim_reference, search_dc_ratios
from .scheduling_dc import DCSolverScheduler
from .scheduling_deis import DEISScheduler, DEISSchedulerOutput

__all__ = [
    "CascadePolynomialRegression",
    "DCSolverScheduler",
    "DEISScheduler",
    "DEISSchedulerOutput",
    "ddim_reference",
    "search_dc_ratios",
]
