"""The codec's public pipeline: rotate, scale, quantize, pack, and the way back.

``encode(x, bits)`` maps every vector (last dimension d, a multiple of 8) to ``d * bits / 8``
packed bytes plus one scale. The scale is the least-squares fit of the chosen codewords to the
rotated vector (not the max-abs), so it minimises the error for the codes that were picked.

Scales are held in one of two formats (``scale_bits``):
- 16: bfloat16. It keeps float32's exponent range, so huge and tiny vectors keep their
  magnitude, and its 8-bit mantissa costs under 1e-5 in relative error.
- 8: a log code per vector, 16 steps per octave, below a power of two (``octave``) shared by
  the whole :class:`Encoded`: code c >= 1 stands for ``2 ** (octave + (c - 255) / 16)``, 0 for
  zero. So 16 octaves below ``2 ** octave`` are held, each scale within 2.2% of its value: a
  scale 2^15 (about 33,000) to 2^16 times smaller than the largest (by where the largest lies
  in its octave) becomes zero. At 2 bits and head_dim 64 a bfloat16 scale is 11% of a vector's
  bytes; at a byte budget the 8-bit one measured better, or within 0.15 points
  (docs/results.md, "8-bit scales"), where 8 steps per octave raised KL by a fifth. Pieces with
  different octaves are joined at the lowest octave that holds them all, by shifting codes by
  whole octaves, which is exact (but for scales that fall off the bottom).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .choices import SCALE_BITS, SUPPORTED_BITS, Method
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
    "SCALE_BITS",
    "join",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCALE_DTYPE = torch.bfloat16  # scale_bits 16
_STEPS = 16  # log-scale codes per octave at scale_bits 8
_TOP = 255  # the code of 2 ** octave
_OCTAVES = (-110, 127)  # octaves a log-scale Encoded may have: every code finite, and normal, in float32
_CHUNK = 1 << 15  # vectors per step: bounds the temporary memory of the search
_TINY = torch.finfo(torch.float32).tiny
_DECODABLE = torch.finfo(torch.float32).max / 2  # decoding runs in float32; half leaves room for rounding


def vector_nbytes(dim: int, bits: int, scale_bits: int = 16) -> int:
    """Bytes one encoded vector of length ``dim`` takes: its packed codes and its scale."""
    return dim * bits // 8 + scale_bits // 8


@dataclass(frozen=True)
class Encoded:
    """Packed codes and scales of a tensor of vectors.

    Attributes:
        codes: uint8 [*batch, d * bits / 8], one little-endian word of ``bits`` bytes per block
            of 8 rotated numbers.
        scales: [*batch], one per vector: bfloat16, or uint8 log codes (see the module's doc).
        bits: bits per number (2, 3 or 4).
        method: the quantizer that wrote the codes.
        seed: seed of the randomized Hadamard rotation.
        dtype: dtype that :func:`decode` returns (the input's).
        octave: the power of two log codes count down from (0 with bfloat16 scales).
    """

    codes: Tensor
    scales: Tensor
    bits: int
    method: Method
    seed: int
    dtype: torch.dtype
    octave: int = 0

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"`bits` must be one of {SUPPORTED_BITS} but got {self.bits!r}")
        if self.codes.dtype != torch.uint8 or self.scales.dtype not in (SCALE_DTYPE, torch.uint8):
            raise ValueError(
                f"codes must be uint8 and scales {SCALE_DTYPE} or uint8 but got {self.codes.dtype} and "
                f"{self.scales.dtype}"
            )
        low, high = _OCTAVES if self.scales.dtype == torch.uint8 else (0, 0)
        integer = isinstance(self.octave, numbers.Integral) and not isinstance(self.octave, bool)
        if not integer or not low <= self.octave <= high:
            raise ValueError(f"`octave` must be an integer in [{low}, {high}] for these scales but got {self.octave!r}")
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

    @property
    def scale_bits(self) -> int:
        return self.scales.element_size() * 8

    def scale_values(self) -> Tensor:
        """The scales as float32 [*batch] (a new tensor)."""
        if self.scales.dtype == SCALE_DTYPE:
            return self.scales.float()
        # A table, not exp2: the same code gives the same float wherever it lies in a tensor
        # (vectorised exp2 may differ in the last bit), so paging changes nothing; times 2^octave is exact.
        return _log_table(self.scales.device)[self.scales.long()].mul_(2.0**self.octave)

    def with_scale_values(self, values: Tensor) -> "Encoded":
        """The same codes with new scales ``values`` (float [*batch]) held in this one's format.
        Log codes hold no sign: a negative value becomes 0, the best scale of that sign; the
        octave becomes the lowest that holds the largest value (codes shift, exactly)."""
        if self.scales.dtype == SCALE_DTYPE:
            return dataclasses.replace(self, scales=values.to(SCALE_DTYPE))
        scales, octave = _log_scales(values.clamp_min(0))
        return dataclasses.replace(self, scales=scales, octave=octave)

    @property
    def lowest_octave(self) -> int:
        """The lowest octave that holds these log scales exactly (a large scale gone, by
        eviction, lets the rest move up); this one's octave for bfloat16 scales."""
        if self.scales.dtype == SCALE_DTYPE or not self.scales.numel():
            return self.octave
        top = int(self.scales.max())
        return max(self.octave - (_TOP - top) // _STEPS, _OCTAVES[0]) if top else _OCTAVES[0]

    def at_octave(self, octave: int) -> "Encoded":
        """The same values with log codes counted down from ``octave`` (not below
        :attr:`lowest_octave`): codes move by whole octaves, exact but for scales that fall below
        the 16 octaves held when the octave rises."""
        if octave < self.lowest_octave:
            raise ValueError(f"these log scales need an octave of at least {self.lowest_octave}, not {octave}")
        if octave == self.octave:
            return self
        shifted = self.scales.int() - (octave - self.octave) * _STEPS
        shifted = shifted.masked_fill_(self.scales == 0, 0)  # zero stays zero
        return dataclasses.replace(self, scales=shifted.clamp_min_(0).to(torch.uint8), octave=octave)

    def to(self, device: torch.device | str) -> "Encoded":
        return dataclasses.replace(self, codes=self.codes.to(device), scales=self.scales.to(device))

    def check_values(self) -> None:
        """Raise ValueError unless every code is a codeword and every scale finite and decodable:
        what codes read from outside (a file) must pass before :func:`decode` sees them."""
        q = quantizer(self.method.value, self.bits)
        largest = math.sqrt(self.dim / 8) * q.largest_block_norm  # of a reconstructed vector, before its scale
        values = self.scale_values()
        if not torch.isfinite(values).all() or (values.abs() * largest > _DECODABLE).any():
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


def encode(x: Tensor, bits: int, method: Method | str = Method.E8, seed: int = 0, scale_bits: int = 16) -> Encoded:
    """Quantize every vector of ``x`` [..., d] to ``bits`` bits per number plus one scale.

    Args:
        x: float16, bfloat16, float32 or float64 tensor; d must be a multiple of 8.
        bits: 2, 3 or 4 bits per number (the scale adds ``scale_bits`` / d more).
        method: ``"e8"`` (E8 lattice codebooks) or ``"scalar"`` (Lloyd-Max levels).
        seed: seed of the randomized Hadamard rotation applied before quantization.
        scale_bits: 16 (bfloat16 scales) or 8 (log codes below the largest scale's octave).
    """
    method = Method(method).value if isinstance(method, Method) else method
    _check(x, bits, method)
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, numbers.Integral) or scale_bits not in SCALE_BITS:
        raise ValueError(f"`scale_bits` must be one of {SCALE_BITS} but got {scale_bits!r}")
    bits = int(bits)  # a numpy integer too
    q = quantizer(method, bits)
    dim = x.shape[-1]
    flat = x.reshape(-1, dim)
    codes = torch.empty(flat.shape[0], dim * bits // 8, dtype=torch.uint8, device=x.device)
    fitted = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)
    norms = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)  # of the chosen codewords
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
        fitted[start : start + _CHUNK] = fit.double() * peak.squeeze(-1).double()
        norms[start : start + _CHUNK] = power.double().sqrt()
        codes[start : start + _CHUNK] = pack_words(words.view(chunk.shape[0], -1), bits)
    too_small = False
    if scale_bits == 16:
        scales, octave = fitted.to(SCALE_DTYPE), 0
        too_small = bool(((scales == 0) & (fitted > 0)).any())
    else:
        scales, octave = _log_scales(fitted)
    stored = Encoded(codes, scales, bits, Method(method), seed, x.dtype, octave).scale_values().double()
    # The decoded vector's largest number is at most its norm: it must stay finite in float32.
    if not torch.isfinite(stored).all() or too_small or (stored.abs() * norms > _DECODABLE).any():
        raise ValueError(
            "`x` holds vectors too large or too small to encode (the scale must fit bfloat16, about "
            "1e-40 to 3e38, and the reconstruction float32); rescale them before encoding"
        )
    return Encoded(
        codes.view(*x.shape[:-1], -1), scales.view(x.shape[:-1]), bits, Method(method), seed, x.dtype, octave
    )


def _log_scales(values: Tensor) -> tuple[Tensor, int]:
    """uint8 log codes of nonnegative ``values`` and their octave, the lowest that holds the largest."""
    largest = float(values.detach().max()) if values.numel() else 0.0
    octave = math.ceil(math.log2(largest)) if largest > 0 else _OCTAVES[0]
    if not _OCTAVES[0] <= octave <= _OCTAVES[1]:
        raise ValueError(
            f"`x` holds vectors too large or too small to encode with 8-bit scales (the largest scale, "
            f"{largest:.3g}, must lie between 2^{_OCTAVES[0]} and 2^{_OCTAVES[1]}); rescale them before encoding"
        )
    steps = torch.log2(values.double()).sub_(octave).mul_(_STEPS).round_().add_(_TOP)
    return steps.clamp_(0, _TOP).to(torch.uint8), octave  # log2(0) = -inf: code 0


def join(parts: list[Encoded], dim: int = -1) -> Encoded:
    """The vectors of ``parts`` (same bits, method and seed) joined along batch axis ``dim`` of
    their scales; log scales move to the highest octave among them."""
    first = parts[0]
    if any(
        (p.bits, p.method, p.seed, p.scales.dtype) != (first.bits, first.method, first.seed, first.scales.dtype)
        for p in parts
    ):
        raise ValueError("pieces joined must share bits, method, seed and scale format")
    parts = _aligned(parts)
    dim = dim % first.scales.dim()
    return dataclasses.replace(
        first,
        codes=torch.cat([p.codes for p in parts], dim),
        scales=torch.cat([p.scales for p in parts], dim),
        octave=parts[0].octave,
    )


def _aligned(parts: list[Encoded]) -> list[Encoded]:
    """``parts`` with their log scales at one octave, the lowest that holds them all (so what
    an evicted large scale lifted comes back down). Parts already at one octave stay: each
    holds its values exactly there (and a decode step reading pages reads no maximum)."""
    if len({p.octave for p in parts}) == 1:
        return parts
    octave = max(p.lowest_octave for p in parts)
    return [p.at_octave(octave) for p in parts]


@functools.lru_cache(maxsize=None)
def _log_table(device: torch.device) -> Tensor:
    """float32 [256]: the value of each log code at octave 0 (code 0: zero), one copy per device."""
    table = torch.exp2((torch.arange(256, dtype=torch.float64) - _TOP) / _STEPS).float()
    table[0] = 0.0
    return table.to(device)


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
    # Pieces read as one octave, as join would hold them: what attention reads is what decode gives.
    scales = first.scale_values() if len(parts) == 1 else torch.cat([p.scale_values() for p in _aligned(parts)], -1)
    if out is None:
        out = torch.empty((*scales.shape, first.dim), dtype=dtype, device=scales.device)
    unit, bias = quantizer(first.method.value, first.bits).units([p.codes for p in parts], out.view(-1, first.dim))
    return out, scales.mul_(unit), bias


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
