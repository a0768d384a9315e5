"""Two precision tiers for 4-bit E8 codes: a token keeps both stages, or drops its second.

A 4-bit E8 word is two 16-bit indices into the same ball codebook, ``c = c1 + c2 / 4``
(quantizers.py), and the first index alone is a 2-bit E8 word. So a token can give up half its
code bytes without being encoded again: :class:`Tiered` holds every token's first stage as a
2-bit :class:`Encoded` (token order, one scale each) and the second stages of the tokens still
at full precision as rows in (batch, head, token) order, found through a bit mask. Demoting a
token keeps its first-stage word bit-identical and refits its scale to the first stage alone
(least squares on the 4-bit reconstruction: the original vector is gone by then). Tokens only
move down.

Every operation on tokens (gather, join, batch indexing, slicing) runs on the first stage and
the mask as it would on any [B, H, T] tensor, and moves the second-stage rows by their index.

Plain torch; knows nothing of transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .encoding import Encoded, join
from .packing import unpack_words
from .quantizers import quantizer
from .rotation import unrotate

__all__ = ["Tiered"]

_UNIT = 0.5  # the units are doubled coordinates: a 4-bit point is 0.5 * (2 c1 + 2 c2 / 4)
_TINY = torch.finfo(torch.float32).tiny
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class Tiered:
    """Old tokens of a 4-bit E8 stream, each at 4 bits or (demoted) at 2.

    Attributes:
        first: the first stage of every token, a 2-bit Encoded (codes [B, H, T, d / 4], scales
            [B, H, T]: the 4-bit fit, or the refit of a demoted token).
        packed_full: uint8 [B, H, ceil(T / 8)], bit t % 8 of byte t // 8 set where token t
            still holds its second stage (a bit per token: the mask costs 1/d bit per number).
        second: uint8 [N, d / 4], the second-stage words of those N tokens in (b, h, t) order.
    """

    first: Encoded
    packed_full: Tensor
    second: Tensor

    @classmethod
    def of(cls, encoded: Encoded) -> "Tiered":
        """Every token of a 4-bit E8 ``encoded`` at full precision (its bytes split, nothing decoded)."""
        if encoded.bits != 4 or encoded.method.value != "e8":
            raise ValueError(f"only 4-bit E8 codes have two tiers, not {encoded.bits}-bit {encoded.method.value}")
        words = encoded.codes.view(*encoded.codes.shape[:-1], -1, 4)  # per block: first index, then second
        first = dataclasses.replace(encoded, codes=words[..., :2].flatten(-2), bits=2)
        full = torch.ones(encoded.scales.shape, dtype=torch.bool, device=encoded.scales.device)
        return cls(first, _pack(full), words[..., 2:].reshape(-1, words.shape[-2] * 2))

    @classmethod
    def checked(cls, first: Encoded, packed_full: Tensor, second: Tensor) -> "Tiered":
        """A Tiered from tensors read from outside (a file), refused with a ValueError unless consistent."""
        tokens = first.scales.shape[-1]
        if packed_full.dtype != torch.uint8 or tuple(packed_full.shape) != (*first.scales.shape[:-1], -(-tokens // 8)):
            raise ValueError(f"the tier mask must be uint8 [..., {-(-tokens // 8)}] for {tokens} tokens")
        if tokens % 8 and (packed_full[..., -1] >> (tokens % 8)).any():
            raise ValueError("the tier mask marks tokens beyond the last one")
        tiered = cls(first, packed_full, second)
        count = int(tiered.full.sum())
        if second.dtype != torch.uint8 or tuple(second.shape) != (count, first.codes.shape[-1]):
            raise ValueError(
                f"second-stage codes must be uint8 [{count}, {first.codes.shape[-1]}] (one row per 4-bit token)"
            )
        first.check_values()
        if not quantizer("e8", 2).is_word(unpack_words(second, 2)).all():
            raise ValueError("second-stage codes hold words that are no codeword of the ball codebook")
        return tiered

    @property
    def full(self) -> Tensor:
        """bool [B, H, T]: which tokens still hold their second stage."""
        return _unpack(self.packed_full, self.length)

    @property
    def length(self) -> int:
        return self.first.scales.shape[-1]

    @property
    def scales(self) -> Tensor:
        return self.first.scales

    @property
    def seed(self) -> int:
        return self.first.seed

    @property
    def shape(self) -> torch.Size:
        return self.first.shape

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + _bytes(self.second) + _bytes(self.packed_full)

    def units(self, out: Tensor, second_out: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
        """As :func:`~nexusquant_cache.codec.decode_units`: ``(units, factor, bias)`` with
        ``factor[..., None] * (units - bias)`` the rotated vectors; ``out`` [B, H, T, d] float32
        receives the units, ``second_out`` (at least [N, d]) the second stages on the way."""
        book = quantizer("e8", 2)
        flat = out.view(-1, out.shape[-1])
        book.units([self.first.codes], flat)  # 2 c1
        rows = self.full.view(-1).nonzero().squeeze(1)
        if len(rows):
            extra = torch.empty_like(flat[: len(rows)]) if second_out is None else second_out[: len(rows)]
            book.units([self.second], extra)  # 2 c2
            flat.index_add_(0, rows, extra, alpha=0.25)  # 2 c1 + 2 c2 / 4 = 2 c: multiples of 1/4, exact
        return out, self.first.scale_values().mul_(_UNIT), 0.0

    def decode(self) -> Tensor:
        """The vectors [B, H, T, d] in the dtype the codes were encoded from."""
        shape = self.shape
        units, factor, _ = self.units(torch.empty(shape, dtype=torch.float32, device=self.second.device))
        values = unrotate(units.mul_(factor[..., None]), self.seed)
        if self.first.dtype == torch.float16:  # rounding may overshoot float16's maximum
            values.clamp_(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
        return values.to(self.first.dtype)

    def demote(self, mask: Tensor) -> "Tiered":
        """The tokens where ``mask`` [B, H, T] is set drop their second stage (those that still hold one)."""
        full = self.full
        going = mask & full
        if not going.any():
            return self
        book = quantizer("e8", 2)
        rows = _row_ids(full)[going]  # their second-stage rows
        flat_codes = self.first.codes.reshape(-1, self.first.codes.shape[-1])
        where = going.view(-1).nonzero().squeeze(1)
        c1 = book.dequantize(unpack_words(flat_codes[where], 2).view(-1)).view(len(where), -1)
        c4 = c1 + book.dequantize(unpack_words(self.second[rows], 2).view(-1)).view(len(where), -1) / 4
        fit = (c4 * c1).sum(-1) / (c1 * c1).sum(-1).clamp_min(_TINY)  # 0 for a zero first stage
        scales = self.first.scale_values().reshape(-1)
        scales[where] *= fit
        kept = full & ~going
        first = self.first.with_scale_values(scales.view(self.first.scales.shape))
        return Tiered(first, _pack(kept), self.second[_row_ids(full)[kept]])

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Tiered":
        """Apply ``fn``, an indexing of the batch, head or token dims of [B, H, T, ...] tensors."""
        full = self.full
        ids = fn(_row_ids(full))
        full = fn(full)
        first = dataclasses.replace(self.first, codes=fn(self.first.codes), scales=fn(self.first.scales))
        return Tiered(first, _pack(full), self.second[ids[full]])

    def take(self, index: Tensor) -> "Tiered":
        """Gather tokens per batch row and head: ``index`` [B, H, K]."""
        return self.map(
            lambda t: t.gather(2, index if t.dim() == 3 else index[..., None].expand(-1, -1, -1, t.shape[-1]))
        )

    @staticmethod
    def concat(parts: list["Tiered"]) -> "Tiered":
        """The tokens of ``parts`` one after another."""
        fulls = [part.full for part in parts]
        offsets = torch.tensor([0, *(len(part.second) for part in parts[:-1])]).cumsum(0).tolist()
        ids = torch.cat([_row_ids(full) + offset for full, offset in zip(fulls, offsets)], -1)
        full = torch.cat(fulls, -1)
        first = join([p.first for p in parts], 2)
        second = torch.cat([p.second for p in parts])
        return Tiered(first, _pack(full), second[ids[full]])


def _row_ids(full: Tensor) -> Tensor:
    """int64 [B, H, T]: each full token's second-stage row (rows follow (b, h, t) order); -1 elsewhere."""
    return (full.view(-1).cumsum(0) - 1).view(full.shape).masked_fill_(~full, -1)


def _pack(mask: Tensor) -> Tensor:
    tokens = mask.shape[-1]
    padded = torch.nn.functional.pad(mask, (0, -tokens % 8)).view(*mask.shape[:-1], -1, 8)
    return (padded.to(torch.uint8) * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack(packed: Tensor, tokens: int) -> Tensor:
    bits = packed[..., None].bitwise_and(_BITS.to(packed.device)) != 0
    return bits.flatten(-2)[..., :tokens].contiguous()


def _bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
