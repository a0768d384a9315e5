"""Pure tensor codec: randomized Hadamard rotation, E8 lattice codebooks, scalar baseline, packing.

Knows nothing of transformers. The public entry points are :func:`encode` and :func:`decode`.
Names are imported on first use (PEP 562): :mod:`.choices` needs no torch.
"""

from .._lazy import lazy_attributes

_HOMES = {
    "SCALE_BITS": "choices",
    "SUPPORTED_BITS": "choices",
    "Method": "choices",
    "SUPPORTED_DTYPES": "encoding",
    "Encoded": "encoding",
    "decode": "encoding",
    "decode_units": "encoding",
    "encode": "encoding",
    "join": "encoding",
    "vector_nbytes": "encoding",
    "OrbitCodebook": "lattice",
    "ball_codebook": "lattice",
    "nearest_d8": "lattice",
    "nearest_e8": "lattice",
    "shell_codebook": "lattice",
    "E8Quantizer": "quantizers",
    "ScalarQuantizer": "quantizers",
    "lloyd_max_levels": "quantizers",
    "Tiered": "tiers",
    "rotate": "rotation",
    "rotation_matrix": "rotation",
    "unrotate": "rotation",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
