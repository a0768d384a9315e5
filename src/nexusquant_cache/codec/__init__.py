"""Pure tensor codec: randomized Hadamard rotation, E8 lattice codebooks, scalar baseline, packing.

Knows nothing of transformers. The public entry points are :func:`encode` and :func:`decode`.
"""

from .encoding import SUPPORTED_BITS, SUPPORTED_DTYPES, Encoded, Method, decode, encode
from .lattice import OrbitCodebook, ball_codebook, nearest_d8, nearest_e8, shell_codebook
from .quantizers import E8Quantizer, ScalarQuantizer, lloyd_max_levels
from .rotation import rotate, rotation_matrix, unrotate

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
    "E8Quantizer",
    "Encoded",
    "Method",
    "OrbitCodebook",
    "ScalarQuantizer",
    "ball_codebook",
    "decode",
    "encode",
    "lloyd_max_levels",
    "nearest_d8",
    "nearest_e8",
    "rotate",
    "rotation_matrix",
    "shell_codebook",
    "unrotate",
]
