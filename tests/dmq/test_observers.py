import math
import warnings

import pytest
import torch

from dmq import formats
from dmq.observers import StreamingObserver


def test_minmax_and_histogram_track_stream_and_memory_is_fixed():
    obs = StreamingObserver(1, histogram=True, nbins=1024)
    size = obs.nbytes
    torch.manual_seed(0)
    chunks = [torch.randn(1000) * (1 + i) for i in range(20)]
    for c in chunks:
        obs.observe(c)
    allx = torch.cat(chunks)
    assert obs.nbytes == size
    assert float(obs.min[0]) == pytest.approx(float(allx.min()))
    assert float(obs.max[0]) == pytest.approx(float(allx.max()))
    assert obs.hist[0].sum() == allx.numel()


def test_percentile_matches_exact_quantile_within_a_bin():
    obs = StreamingObserver(1, nbins=4096)
    torch.manual_seed(0)
    x = torch.randn(200_000)
    for c in x.chunk(10):
        obs.observe(c)
    lo, hi = obs.estimate_range(0, formats.get("int8"), True, "percentile", 99.0)
    exact = float(torch.quantile(x.abs(), 0.99))
    bin_width = 2 * float(obs.radius[0]) / 4096
    assert abs(hi - exact) <= 2 * bin_width and lo == -hi


def test_mse_search_clips_heavy_tails():
    obs = StreamingObserver(1)
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 60.0  # one outlier
    obs.observe(x)
    lo, hi = obs.estimate_range(0, formats.get("int4"), True, "mse")
    assert hi < 60.0 * 0.5
    # the searched range quantizes the bulk far better than min-max
    assert math.isfinite(hi)


def test_nonfinite_values_are_skipped_and_counted():
    obs = StreamingObserver(1)
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf")])
    obs.observe(x)
    assert obs.nonfinite == 3
    assert float(obs.min[0]) == -2.0 and float(obs.max[0]) == 1.0


def test_per_sample_bins_go_to_their_bins():
    obs = StreamingObserver(3, histogram=False)
    x = torch.stack([torch.full((5,), 1.0), torch.full((5,), 7.0), torch.full((5,), -3.0)])
    obs.observe(x, torch.tensor([0, 2, 2]))
    assert obs.observed_bins() == [0, 2]
    assert float(obs.max[2]) == 7.0 and float(obs.min[2]) == -3.0 and float(obs.max[0]) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obs.observe(torch.zeros(3, 2), torch.tensor([1]))
    assert obs.observed_bins() == [0, 1, 2]
