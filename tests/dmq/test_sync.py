"""The observer statistics reduce exactly: histograms built on parts of the data and merged at a common radius
equal the histogram of all the data, bit for bit (what dmq.sync_statistics relies on across processes)."""

import torch

from dmq.observers import StreamingObserver
from dmq.sync import align


def _chunks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.zeros(50),                                                     # zeros only: no radius yet
        torch.randn(3000, generator=g) * 0.3,
        torch.tensor([1.0, -1.0, 0.5, -0.25, 2.0 ** -40, -(2.0 ** -40), -1e-30, 0.0]),  # bin edges, tiny values
        torch.randn(3000, generator=g) * 5.0,                                # forces doublings
        torch.tensor([8.0, -8.0, 7.999, -16.0]),
    ]


def _combine(parts: list[StreamingObserver]) -> StreamingObserver:
    radius = torch.stack([p.radius for p in parts]).amax(0)
    out = StreamingObserver(1)
    for p in parts:
        align(p, radius)
        out.hist += p.hist
        out.count += p.count
        out.min = torch.minimum(out.min, p.min)
        out.max = torch.maximum(out.max, p.max)
    out.radius = radius
    return out


def test_split_histograms_merge_to_the_single_histogram_exactly():
    chunks = _chunks()
    whole = StreamingObserver(1)
    for c in chunks:
        whole.observe(c)
    for split in range(1, len(chunks)):
        parts = [StreamingObserver(1), StreamingObserver(1)]
        for i, c in enumerate(chunks):
            parts[int(i >= split)].observe(c)
        merged = _combine(parts)
        assert torch.equal(merged.radius, whole.radius) and float(whole.radius[0]) == 32.0  # 16 needs [-32, 32)
        assert torch.equal(merged.hist, whole.hist), split
        assert torch.equal(merged.count, whole.count) and torch.equal(merged.min, whole.min)
        assert torch.equal(merged.max, whole.max)
    assert whole.hist.sum() == sum(c.numel() for c in chunks)


def test_binning_is_exact_at_power_of_two_edges():
    obs = StreamingObserver(1, nbins=8)
    obs.observe(torch.tensor([-1.999, -1.5, -1e-30, 0.0, 0.5, 1.999]))  # radius 2: bins of width 0.5 on [-2, 2)
    assert float(obs.radius[0]) == 2.0
    assert obs.hist[0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    obs.observe(torch.tensor([2.0]))  # |x| = R: the range doubles (half-open bins), pairs merge
    assert float(obs.radius[0]) == 4.0
    assert obs.hist[0].tolist() == [0.0, 0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 0.0]
