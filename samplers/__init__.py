"""samplers: fast diffusion samplers as drop-in diffusers schedulers.

``DEISScheduler`` implements DEIS (Zhang & Chen, ICLR 2023): tAB, ρAB, ρRK and iPNDM. The math is in
``samplers.deis`` (update plans), ``samplers.quadrature``, ``samplers.grids`` and ``samplers.schedules``.
``DCSolverScheduler`` implements DC-Solver (Zhao et al., ECCV 2024): UniPC (``samplers.unipc``) with dynamic
compensation, its ratio search (``samplers.dc``) and cascade polynomial regression (``samplers.cpr``).
"""

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
