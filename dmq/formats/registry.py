"""Format names: ``dmq.formats.get("e2m1")``."""

from __future__ import annotations

from typing import Union

from dmq.formats.block import MXFormat, NVFP4Format
from dmq.formats.element import FloatFormat, IntFormat

Format = Union[IntFormat, FloatFormat, MXFormat, NVFP4Format]


def _build() -> dict[str, Format]:
    table: dict[str, Format] = {}
    for b in range(2, 9):
        table[f"int{b}"] = IntFormat(b, signed=True)
        table[f"uint{b}"] = IntFormat(b, signed=False)
    for e in range(1, 6):
        for m in range(8):
            table[f"e{e}m{m}"] = FloatFormat(e, m)
    for name, elem in [("mxfp8", "e4m3"), ("mxfp8_e5m2", "e5m2"), ("mxfp6_e3m2", "e3m2"), ("mxfp6_e2m3", "e2m3"),
                       ("mxfp4", "e2m1")]:
        table[name] = MXFormat(name, table[elem])  # type: ignore[arg-type]
    table["nvfp4"] = NVFP4Format()
    return table


_FORMATS = _build()


def names() -> list[str]:
    """Every registered format name."""
    return list(_FORMATS)


def get(name: str | Format) -> Format:
    """The format called ``name`` (a format object passes through). Unknown names raise ``ValueError``."""
    if not isinstance(name, str):
        if isinstance(name, (IntFormat, FloatFormat, MXFormat, NVFP4Format)):
            return name
        raise TypeError(f"expected a format name or object, got {type(name).__name__}")
    try:
        return _FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(_FORMATS)}") from None
