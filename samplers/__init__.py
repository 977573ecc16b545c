"""samplers: fast diffusion samplers (DEIS, DC-Solver) as drop-in diffusers schedulers."""

__all__: list[str] = []
