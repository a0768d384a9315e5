"""What the codec offers: its methods and bit widths. No torch here, so a configuration can be
checked (and the command line can list the choices) without loading it."""

from enum import Enum

__all__ = ["SUPPORTED_BITS", "Method"]

SUPPORTED_BITS = (2, 3, 4)


class Method(str, Enum):
    E8 = "e8"
    SCALAR = "scalar"
