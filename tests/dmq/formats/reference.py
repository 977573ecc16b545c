"""Brute-force references written from the definitions, independent of dmq's rounding kernel.

Rounding searches the explicit sorted grid (from ``fmt.values()``) for the two neighbours of each value and picks
the nearer. A tie goes to the neighbour whose magnitude is an even multiple of the gap between the two: the even
integer for INT, the even significand for minifloats (the gap is the step of the smaller one's binade), and the
larger magnitude for M = 0 formats, whose significands are all 1.
"""

import numpy as np


def nearest_even(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Round float64 ``x`` to the sorted ``grid``: saturate to its ends, nearest, ties to the even code."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    xc = np.clip(np.where(nan, 0.0, x), grid[0], grid[-1])
    hi = np.searchsorted(grid, xc, side="left").clip(0, len(grid) - 1)
    lo = np.where(grid[hi] == xc, hi, (hi - 1).clip(0))
    a, b = grid[lo], grid[hi]
    da, db = xc - a, b - xc
    small, big = np.minimum(np.abs(a), np.abs(b)), np.maximum(np.abs(a), np.abs(b))
    gap = np.where(big > small, big - small, 1.0)
    even_big = np.fmod(big / gap, 2) == 0
    b_even = np.where(np.abs(b) == big, even_big, ~even_big)
    pick_b = (db < da) | ((db == da) & b_even & (a != b))
    out = np.where(pick_b, b, a)
    return np.where(nan, np.nan, out)


def neighbours(x: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid points just below and just above each in-range ``x`` (equal when ``x`` is on the grid)."""
    hi = np.searchsorted(grid, x, side="left").clip(0, len(grid) - 1)
    lo = np.where(grid[hi] == x, hi, (hi - 1).clip(0))
    return grid[lo], grid[hi]
