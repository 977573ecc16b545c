import pytest
import torch

from dmq.config import QuantSpec
from dmq.format_search import candidates, search_format
from dmq.rounding import layer_error, weight_grid


def test_candidates_keep_the_width():
    names = [c.format for c in candidates(QuantSpec("e2m1", "channel"))]
    assert names == ["e2m1", "e1m2", "e3m0"]
    assert all(c.estimator == "fp_bias" for c in candidates(QuantSpec("e3m2", "channel")))
    assert [c.format for c in candidates(QuantSpec("int4", "channel"))] == ["int4"]


@pytest.mark.parametrize("dist", ["uniform", "heavy"])
def test_search_picks_the_least_output_error(dist):
    g = torch.Generator().manual_seed(0)
    if dist == "uniform":
        w = torch.rand(32, 64, generator=g) * 2 - 1
    else:  # Student-t-like: Gaussian over a random scale, heavy tails favour more exponent bits
        w = torch.randn(32, 64, generator=g) / torch.rand(32, 64, generator=g).clamp(min=0.02)
    x = torch.randn(512, 64, generator=g)
    hess = x.T @ x / 512
    spec = QuantSpec("e2m1", "channel")
    best, errs = search_format(w, hess, spec)
    independent = {c.format: layer_error(hess, w, weight_grid(w, c).nearest(w)) for c in candidates(spec)}
    assert errs == pytest.approx(independent)
    assert best.format == min(independent, key=independent.get)
    assert errs[best.format] <= errs["e2m1"]
    assert best.format == ("e1m2" if dist == "uniform" else "e3m0")
