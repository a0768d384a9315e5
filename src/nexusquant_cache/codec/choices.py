"""What the codec offers: its methods and bit widths. No torch here, so a configuration can be
checked (and the command line can list the choices) without loading it."""

from enum import Enum

__all__ = ["SCALE_BITS", "SUPPORTED_BITS", "Method"]

SUPPORTED_BITS = (2, 3, 4)
SCALE_BITS = (16, 8)  # bfloat16 scales, or 8-bit log codes (encoding.py)


class Method(str, Enum):
    E8 = "e8"
    SCALAR = "scalar"
