"""The codec's public pipeline: rotate, scale, quantize, pack, and the way back.

``encode(x, bits)`` maps every vector (last dimension d, a multiple of 8) to ``d * bits / 8``
packed bytes plus one bfloat16 scale. The scale is the least-squares fit of the chosen codewords
to the rotated vector (not the max-abs), so it minimises the error for the codes that were
picked. bfloat16 keeps float32's exponent range: huge and tiny vectors keep their magnitude, and
its 8-bit mantissa costs under 1e-5 in relative error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .choices import SUPPORTED_BITS, Method
from .packing import pack_words, unpack_words
from .quantizers import quantizer
from .rotation import rotate, unrotate

__all__ = [
    "Method",
    "Encoded",
    "encode",
    "decode",
    "decode_units",
    "vector_nbytes",
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCALE_DTYPE = torch.bfloat16
_CHUNK = 1 << 15  # vectors per step: bounds the temporary memory of the search
_TINY = torch.finfo(torch.float32).tiny
_DECODABLE = torch.finfo(torch.float32).max / 2  # decoding runs in float32; half leaves room for rounding


def vector_nbytes(dim: int, bits: int) -> int:
    """Bytes one encoded vector of length ``dim`` takes: its packed codes and its scale."""
    return dim * bits // 8 + SCALE_DTYPE.itemsize


@dataclass(frozen=True)
class Encoded:
    """Packed codes and scales of a tensor of vectors.

    Attributes:
        codes: uint8 [*batch, d * bits / 8], one little-endian word of ``bits`` bytes per block
            of 8 rotated numbers.
        scales: bfloat16 [*batch], one per vector.
        bits: bits per number (2, 3 or 4).
        method: the quantizer that wrote the codes.
        seed: seed of the randomized Hadamard rotation.
        dtype: dtype that :func:`decode` returns (the input's).
    """

    codes: Tensor
    scales: Tensor
    bits: int
    method: Method
    seed: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"`bits` must be one of {SUPPORTED_BITS} but got {self.bits!r}")
        if self.codes.dtype != torch.uint8 or self.scales.dtype != SCALE_DTYPE:
            raise ValueError(
                f"codes must be uint8 and scales {SCALE_DTYPE} but got {self.codes.dtype} and {self.scales.dtype}"
            )
        if self.codes.shape[:-1] != self.scales.shape or self.codes.shape[-1] % self.bits:
            raise ValueError(
                f"codes {tuple(self.codes.shape)} do not match scales {tuple(self.scales.shape)} at {self.bits} bits"
            )
        object.__setattr__(self, "method", Method(self.method))

    @property
    def dim(self) -> int:
        """Length d of each vector."""
        return self.codes.shape[-1] * 8 // self.bits

    @property
    def shape(self) -> torch.Size:
        """Shape of the decoded tensor."""
        return torch.Size((*self.scales.shape, self.dim))

    @property
    def nbytes(self) -> int:
        """Every byte held: codes and scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def to(self, device: torch.device | str) -> "Encoded":
        return Encoded(self.codes.to(device), self.scales.to(device), self.bits, self.method, self.seed, self.dtype)

    def check_values(self) -> None:
        """Raise ValueError unless every code is a codeword and every scale finite and decodable:
        what codes read from outside (a file) must pass before :func:`decode` sees them."""
        q = quantizer(self.method.value, self.bits)
        largest = math.sqrt(self.dim / 8) * q.largest_block_norm  # of a reconstructed vector, before its scale
        if not torch.isfinite(self.scales).all() or (self.scales.float().abs() * largest > _DECODABLE).any():
            raise ValueError(f"scales must be finite and below {_DECODABLE / largest:.3g} (or decoding overflows)")
        codes = self.codes.reshape(-1, self.codes.shape[-1])
        for start in range(0, codes.shape[0], _CHUNK):
            if not q.is_word(unpack_words(codes[start : start + _CHUNK], self.bits)).all():
                raise ValueError(
                    f"codes hold words that are no codeword of the {self.bits}-bit {self.method.value} codebook"
                )


def _check(x: Tensor, bits: int, method: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor but got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"`x` must have a floating dtype in {SUPPORTED_DTYPES} but got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"`x` must hold at least one vector but has shape {tuple(x.shape)}")
    if x.shape[-1] % 8:
        raise ValueError(f"the last dimension of `x` must be a multiple of 8 but got {x.shape[-1]}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS} but got {bits!r}")
    if method not in {m.value for m in Method}:
        raise ValueError(f"`method` must be one of {[m.value for m in Method]} but got {method!r}")
    if not torch.isfinite(x).all():
        raise ValueError("`x` contains NaN or infinite values, which cannot be encoded")


def encode(x: Tensor, bits: int, method: Method | str = Method.E8, seed: int = 0) -> Encoded:
    """Quantize every vector of ``x`` [..., d] to ``bits`` bits per number plus one scale.

    Args:
        x: float16, bfloat16, float32 or float64 tensor; d must be a multiple of 8.
        bits: 2, 3 or 4 bits per number (the scale adds 16 / d more).
        method: ``"e8"`` (E8 lattice codebooks) or ``"scalar"`` (Lloyd-Max levels).
        seed: seed of the randomized Hadamard rotation applied before quantization.
    """
    method = Method(method).value if isinstance(method, Method) else method
    _check(x, bits, method)
    bits = int(bits)  # a numpy integer too
    q = quantizer(method, bits)
    dim = x.shape[-1]
    flat = x.reshape(-1, dim)
    codes = torch.empty(flat.shape[0], dim * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(flat.shape[0], dtype=SCALE_DTYPE, device=x.device)
    for start in range(0, flat.shape[0], _CHUNK):
        chunk = flat[start : start + _CHUNK]
        # Dividing by the peak in the input's own dtype keeps every magnitude finite in float32.
        peak = chunk.abs().amax(-1, keepdim=True)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        rotated = rotate((chunk / peak).float(), seed)
        unit = rotated.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(_TINY) * q.load
        points, words = q.quantize((rotated / unit).view(-1, 8))
        points = points.view_as(rotated)
        power = (points * points).sum(-1)
        fit = (rotated * points).sum(-1) / power.clamp_min(_TINY)
        scale = fit.double() * peak.squeeze(-1).double()
        stored = scale.to(SCALE_DTYPE)
        # The decoded vector's largest number is at most its norm: it must stay finite in float32.
        largest = stored.double().abs() * power.double().sqrt()
        if not torch.isfinite(stored).all() or ((stored == 0) & (scale > 0)).any() or (largest > _DECODABLE).any():
            raise ValueError(
                "`x` holds vectors too large or too small to encode (the scale must fit bfloat16, about "
                "1e-40 to 3e38, and the reconstruction float32); rescale them before encoding"
            )
        scales[start : start + _CHUNK] = stored
        codes[start : start + _CHUNK] = pack_words(words.view(chunk.shape[0], -1), bits)
    return Encoded(codes.view(*x.shape[:-1], -1), scales.view(x.shape[:-1]), bits, Method(method), seed, x.dtype)


def decode_units(encoded: Encoded | list[Encoded], dtype: torch.dtype = torch.float32, out: Tensor | None = None):
    """The reconstruction in the rotated domain, before the inverse rotation, as
    ``factor[..., None] * (units - bias)``: returns ``(units, factor, bias)``.

    ``units`` [..., d] holds small integers at 2 and 4 bits (exact in any floating ``dtype``;
    multiples of 0.28 added at 3 bits; written into ``out`` when given, a contiguous tensor of
    that shape), ``factor`` [...] float32 is each
    vector's scale times the codebook's unit, ``bias`` a float. So ``decode(e) ==
    unrotate(factor[..., None] * (units - bias))``, and attention can use the codes as they are:
    ``q . R^T y = (R q) . y`` for the query, one ``factor`` per token on the logits, and the
    bias as one correction per query.

    ``encoded`` may be a list of pieces with the same bits, method and seed, read as one: joined
    along their last batch axis (codes [..., T_i, bytes], scales [..., T_i]); paged storage costs
    one copy of the codes, an eighth of the units' bytes at 4 bits.
    """
    parts = [encoded] if isinstance(encoded, Encoded) else encoded
    first = parts[0]
    if any((p.bits, p.method, p.seed) != (first.bits, first.method, first.seed) for p in parts):
        raise ValueError("pieces read as one must share bits, method and seed")
    scales = first.scales if len(parts) == 1 else torch.cat([p.scales for p in parts], -1)
    if out is None:
        out = torch.empty((*scales.shape, first.dim), dtype=dtype, device=scales.device)
    unit, bias = quantizer(first.method.value, first.bits).units([p.codes for p in parts], out.view(-1, first.dim))
    return out, scales.float().mul_(unit), bias


def decode(encoded: Encoded) -> Tensor:
    """The reconstruction of :func:`encode`'s input, in its dtype and shape."""
    codes = encoded.codes.reshape(-1, encoded.codes.shape[-1])
    scales = encoded.scales.reshape(-1)
    parts = []
    for start in range(0, codes.shape[0], _CHUNK):
        chunk = dataclasses.replace(encoded, codes=codes[start : start + _CHUNK], scales=scales[start : start + _CHUNK])
        units, factor, bias = decode_units(chunk)
        values = unrotate(units.sub_(bias).mul_(factor[:, None]), encoded.seed)
        if encoded.dtype == torch.float16:  # rounding may overshoot float16's maximum
            values.clamp_(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
        parts.append(values.to(encoded.dtype))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.view(encoded.shape)
