"""Number formats as data: INT and minifloat element grids, MX and NVFP4 block formats, and code packing.

>>> from dmq import formats
>>> formats.get("e2m1").values().tolist()
[-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""

from dmq.formats.block import MXFormat, NVFP4Format
from dmq.formats.element import SPECIALS, ElementFormat, FloatFormat, IntFormat
from dmq.formats.grid import GridSpec, round_to_grid
from dmq.formats.packing import pack, packed_nbytes, unpack
from dmq.formats.registry import Format, get, names

__all__ = [
    "SPECIALS", "ElementFormat", "FloatFormat", "Format", "GridSpec", "IntFormat", "MXFormat", "NVFP4Format", "get",
    "names", "pack", "packed_nbytes", "round_to_grid", "unpack",
]
