"""SVDQuant's low-rank branch (Li et al., 2025): ``W = U V + R`` with ``U V`` the best rank-r approximation
(truncated SVD, Eckart-Young), kept in 16 bit, and only the residual ``R`` quantized:
``y = Q(x) Q(R)^T + (x V^T) U^T``. The branch absorbs the large singular directions (and with them outliers that
smoothing moved into the weight), so the residual has a smaller range.
"""

from __future__ import annotations

import torch


def low_rank(w: torch.Tensor, rank: int, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the rank-``rank`` truncated SVD of ``w`` (``(O, K)``); ``up`` carries the
    singular values. ``torch.svd_lowrank`` (randomised, 4 power iterations) serves ranks below a quarter of the
    smaller side unless ``exact``; the full SVD serves the rest."""
    w = w.detach().double()
    r = min(rank, *w.shape)
    if exact is None:
        exact = 4 * r >= min(w.shape)
    if exact:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :r] * s[:r]).float(), vh[:r].float()
    with torch.random.fork_rng():  # svd_lowrank draws from the global generator: keep results reproducible
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(r + 8, *w.shape), niter=4)
    return (u[:, :r] * s[:r]).float(), v[:, :r].T.float()
