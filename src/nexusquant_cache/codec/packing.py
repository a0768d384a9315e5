"""Bit packing: one integer word per 8-number block, stored as little-endian bytes.

Every quantizer spends exactly ``8 * bits`` bits on a block of 8 numbers, i.e. ``bits`` whole
bytes, so a block's word packs into bytes with no padding and no wasted bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_words", "unpack_words"]


def pack_words(words: Tensor, nbytes: int) -> Tensor:
    """int64 words [..., n], each < 2^(8 nbytes) -> uint8 bytes [..., n * nbytes]."""
    shifts = 8 * torch.arange(nbytes, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_words(data: Tensor, nbytes: int) -> Tensor:
    """uint8 bytes [..., n * nbytes] -> int64 words [..., n]; the inverse of :func:`pack_words`."""
    shifts = 8 * torch.arange(nbytes, device=data.device)
    grouped = data.unflatten(-1, (data.shape[-1] // nbytes, nbytes)).long()
    return (grouped << shifts).sum(-1)
