"""Names resolve to formats, unknown names fail loudly, and every format honours the same contract."""

import pytest
import torch

from dmq import formats


def test_every_documented_name_is_registered():
    expected = {f"int{b}" for b in range(2, 9)} | {f"uint{b}" for b in range(2, 9)}
    expected |= {f"e{e}m{m}" for e in range(1, 6) for m in range(8)}
    expected |= {"mxfp8", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "nvfp4"}
    assert expected <= set(formats.names())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        formats.get("fp5")
    msg = str(err.value)
    assert "'fp5'" in msg and "e2m1" in msg and "nvfp4" in msg and "int8" in msg
    with pytest.raises(ValueError):
        formats.get("e6m1")
    with pytest.raises(TypeError):
        formats.get(3)


def test_get_is_case_insensitive_and_passes_objects_through():
    assert formats.get("E2M1") is formats.get("e2m1")
    fmt = formats.FloatFormat(2, 1, bias=2)
    assert formats.get(fmt) is fmt


def test_bits():
    assert [formats.get(n).bits for n in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int4", "uint8")] == [8, 8, 6, 6, 4,
                                                                                                        4, 8]
    assert formats.get("e5m7").bits == 13


@pytest.mark.parametrize("name", formats.names())
def test_format_contract(name):
    """Shape and dtype kept, input untouched, NaN kept, values bounded by the format's range."""
    fmt = formats.get(name)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0)) * 4
    x[0, 0] = float("nan")
    before = x.clone()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = fmt.quantize(x.to(dtype))
        assert q.shape == x.shape and q.dtype == dtype
        assert torch.isnan(q[0, 0]) and not torch.isnan(q.flatten()[1:]).any()
    torch.testing.assert_close(x, before, equal_nan=True, rtol=0, atol=0)
    q = fmt.quantize(x).flatten()[1:]
    if not fmt.is_block:
        assert q.max() <= fmt.max and q.min() >= fmt.min
