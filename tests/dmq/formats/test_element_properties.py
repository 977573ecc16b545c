"""Property tests over every element format: on the grid, idempotent, monotone, nearest with ties to even,
error within half a step."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmq import formats
from dmq.formats import FloatFormat
from tests.dmq.formats.reference import nearest_even, neighbours

ELEMENT_NAMES = [n for n in formats.names() if not formats.get(n).is_block]
# variants a bias search or another convention produces: integer and real biases, other special-value rules
VARIANTS = [
    FloatFormat(2, 1, bias=3), FloatFormat(3, 2, bias=-2), FloatFormat(4, 3, bias=10, special="fn"),
    FloatFormat(4, 3, special="ieee"), FloatFormat(5, 2, special="fn"), FloatFormat(3, 3, special="ieee"),
]
REAL_BIAS = [FloatFormat(2, 1, bias=1.37), FloatFormat(4, 3, bias=5.61), FloatFormat(3, 2, bias=-0.25)]
FORMATS = [formats.get(n) for n in ELEMENT_NAMES] + VARIANTS


def values_for(fmt):
    """Hypothesis strategy: batches of float32 values around the grid, exact ties and beyond the range."""
    grid = fmt.values().numpy()
    mids = (grid[1:] + grid[:-1]) / 2
    span = 2.0 * float(np.abs(grid).max())
    anywhere = st.floats(-span, span, width=32)
    near_grid = st.builds(lambda v, k: float(np.float32(v)) * (1 + k * 2.0**-20), st.sampled_from(list(grid)),
                          st.integers(-3, 3))
    ties = st.sampled_from([float(np.float32(m)) for m in mids if np.float32(m) == m])
    return st.lists(st.one_of(anywhere, near_grid, ties), min_size=1, max_size=64)


def _q(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float32)
    return x, fmt.quantize(x)


def per_format(test):
    return pytest.mark.parametrize("fmt", FORMATS, ids=str)(test)


@per_format
def test_outputs_lie_on_the_grid(fmt):
    @given(values_for(fmt))
    def check(xs):
        _, q = _q(fmt, xs)
        assert torch.isin(q.double(), fmt.values()).all()
    check()


@per_format
def test_idempotent(fmt):
    @given(values_for(fmt))
    def check(xs):
        _, q = _q(fmt, xs)
        assert torch.equal(fmt.quantize(q), q)
    check()


@per_format
def test_monotone(fmt):
    @given(values_for(fmt))
    def check(xs):
        x, q = _q(fmt, sorted(xs))
        assert (q[1:] >= q[:-1]).all()
    check()


@per_format
def test_nearest_with_ties_to_even(fmt):
    @given(values_for(fmt))
    def check(xs):
        x, q = _q(fmt, xs)
        ref = nearest_even(x.double().numpy(), fmt.values().numpy())
        np.testing.assert_array_equal(q.double().numpy(), ref)
    check()


@per_format
def test_error_is_at_most_half_a_step_in_range(fmt):
    @given(values_for(fmt))
    def check(xs):
        x, q = _q(fmt, xs)
        x = x[(x >= fmt.min) & (x <= fmt.max)].double()
        q = fmt.quantize(x.float()).double()
        lo, hi = neighbours(x.numpy(), fmt.values().numpy())
        assert (np.abs(q.numpy() - x.numpy()) <= (hi - lo) / 2).all()
    check()


@pytest.mark.parametrize("fmt", REAL_BIAS, ids=str)
def test_real_valued_bias_scales_the_default_grid(fmt):
    base = FloatFormat(fmt.exp_bits, fmt.man_bits, special=fmt.special)
    assert fmt.scale == pytest.approx(2.0 ** (base.default_bias - fmt.bias), rel=2**-16)
    torch.testing.assert_close(fmt.values(), base.values() * fmt.scale, rtol=0, atol=0)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * fmt.max / 2
    q = fmt.quantize(x)
    assert torch.isin(q.double(), fmt.values()).all()
    # quantizing with a scaled grid is the default grid applied to x / scale, up to float32 rounding of x / scale
    ref = torch.from_numpy(nearest_even(x.double().numpy(), fmt.values().numpy()))
    worse = (q.double() - x.double()).abs() > (ref - x.double()).abs() * (1 + 2**-20) + 1e-30
    assert not worse.any()
    assert torch.equal(fmt.decode(fmt.encode(x)), q)


@per_format
def test_all_input_dtypes_agree_with_float32(fmt):
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * fmt.max / 3
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        q = fmt.quantize(xd)
        assert q.dtype == dtype
        ref = fmt.quantize(xd.float()).to(dtype)  # every grid value of these formats is exact in float32
        assert torch.equal(q, ref) if dtype != torch.float64 else torch.equal(q.float(), ref.float())


@per_format
def test_nan_is_preserved_and_inf_saturates(fmt):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    q = fmt.quantize(x)
    assert torch.isnan(q[0]) and q[1] == fmt.max and q[2] == fmt.min and q[3] == 0


@per_format
def test_encode_decode_round_trip(fmt):
    codes = torch.arange(2**fmt.bits)
    vals = fmt.decode(codes)
    finite = torch.isfinite(vals)
    # every finite code decodes to a value that encodes back to itself (±0 share the + code for INT)
    back = fmt.encode(vals[finite])
    assert torch.equal(fmt.decode(back), vals[finite])
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2)) * fmt.max
    assert torch.equal(fmt.decode(fmt.encode(x)), fmt.quantize(x))
    assert fmt.encode(x).dtype == (torch.uint8 if fmt.bits <= 8 else torch.int16)


def test_nan_in_a_finite_format_cannot_be_encoded():
    with pytest.raises(ValueError, match="no NaN encoding"):
        formats.get("e2m1").encode(torch.tensor([1.0, float("nan")]))
    assert torch.isnan(formats.get("e4m3").decode(formats.get("e4m3").encode(torch.tensor([float("nan")]))))


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_grids(bits):
    s, u = formats.get(f"int{bits}"), formats.get(f"uint{bits}")
    assert s.values().tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert u.values().tolist() == list(range(2**bits))
    assert s.bits == u.bits == bits
    x = torch.tensor([-0.5, 0.5, 1.5, 2.5, -1.5, -2.5])
    even = torch.tensor([0.0, 0.0, 2.0, 2.0, -2.0, -2.0]).clamp(s.qmin, s.qmax)  # half-way goes to the even integer
    assert torch.equal(s.quantize(x), even)
    assert u.quantize(torch.tensor([-3.0, 0.4])).tolist() == [0.0, 0.0]


def test_float_format_validation():
    with pytest.raises(ValueError, match="1..5 exponent"):
        FloatFormat(6, 1)
    with pytest.raises(ValueError, match="special must be one of"):
        FloatFormat(2, 1, special="saturating")
    with pytest.raises(ValueError, match="no nonzero value"):
        FloatFormat(1, 0, special="ieee")
    with pytest.raises(ValueError, match="bias must be finite"):
        FloatFormat(2, 1, bias=float("nan"))
    with pytest.raises(TypeError, match="floating-point"):
        formats.get("int8").quantize(torch.tensor([1, 2]))
