"""Bit packing: one integer word per 8-number block, stored as little-endian bytes.

Every quantizer spends exactly ``8 * bits`` bits on a block of 8 numbers, i.e. ``bits`` whole
bytes, so a block's word packs into bytes with no padding and no wasted bits. Words of 1, 2 or
4 bytes are reinterpreted in place on little-endian machines (a byte view, no arithmetic);
other widths, and big-endian machines, go through shifts.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["pack_words", "unpack_words"]

_VIEW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32} if sys.byteorder == "little" else {}


def pack_words(words: Tensor, nbytes: int) -> Tensor:
    """int64 words [..., n], each < 2^(8 nbytes) -> uint8 bytes [..., n * nbytes]."""
    if nbytes in _VIEW_DTYPES:
        # The cast wraps words >= 2^(8 nbytes - 1) to negative values: the same bits.
        return words.to(_VIEW_DTYPES[nbytes]).view(torch.uint8)
    shifts = 8 * torch.arange(nbytes, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_words(data: Tensor, nbytes: int) -> Tensor:
    """uint8 bytes [..., n * nbytes] -> int64 words [..., n]; the inverse of :func:`pack_words`."""
    if nbytes in _VIEW_DTYPES:
        return data.contiguous().view(_VIEW_DTYPES[nbytes]).long() & ((1 << (8 * nbytes)) - 1)
    shifts = 8 * torch.arange(nbytes, device=data.device)
    grouped = data.unflatten(-1, (data.shape[-1] // nbytes, nbytes)).long()
    return (grouped << shifts).sum(-1)
