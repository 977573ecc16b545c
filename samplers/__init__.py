"""samplers: fast diffusion samplers as drop-in diffusers schedulers.

``DEISScheduler`` implements DEIS (Zhang & Chen, ICLR 2023): tAB, ρAB, ρRK and iPNDM. The math is in
``samplers.deis`` (update plans), ``samplers.quadrature``, ``samplers.grids`` and ``samplers.schedules``.
"""

from .scheduling_deis import DEISScheduler, DEISSchedulerOutput

__all__ = ["DEISScheduler", "DEISSchedulerOutput"]
