"""Old tokens of a layer's keys or values, held in fixed-size pages of tokens.

A stream's old tokens are rows along dim 2 of [B, H, T, ...] tensors: an :class:`Encoded`
(codes and scales, paged together), a :class:`Tiered` (codes at two precisions) or full-precision
states at 16 bits. :class:`Pages` holds them as full pages of ``size`` tokens then one last page
exactly as long as what it holds. Adding a block rewrites only that last page, so settling costs
O(page + block) whatever the context, and no byte is allocated beyond the tokens held
(``stats()`` counts every one).

Eviction keeps a different set of tokens per head, so it gathers every page once (as its ranking
reads every token's score) and lays the survivors out in pages again. A step's attention reads
the pages through :func:`~nexusquant_cache.codec.decode_units`, which joins them: one copy of
the codes per step when there are several, hence the large default page (``PAGE_TOKENS``).

Plain torch and the codec's :class:`Encoded` and :class:`Tiered`; knows nothing of transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from .codec import Encoded, Tiered, join

__all__ = ["PAGE_TOKENS", "Pages", "Rows", "take", "concat", "length"]

# Tokens per page. A decode step reads the codes joined (one copy of them when there are several
# pages), while a page saves a copy of the history once per block (1/32 to 1/64 as often): with
# pages of 1,024 tokens a SmolLM2 decode step was 4% slower at 4k tokens, 6% at 16k
# (benchmarks/page_size.py). So up to 64k tokens per layer the old tokens stay one tensor, read
# in place; beyond, a settle rewrites at most one page and never reallocates the whole history.
# A kernel reading pages in place (a GPU engine's block table) would take small pages.
PAGE_TOKENS = 1 << 16

Rows = Encoded | Tiered | Tensor


class Pages:
    """Rows [B, H, T, ...] along dim 2 as pages: all of ``size`` tokens but the last (1 .. size)."""

    def __init__(self, size: int | None = None):
        self.size = size or PAGE_TOKENS
        self.pages: list[Rows] = []
        self.length = 0

    @classmethod
    def of(cls, rows: Rows | None, size: int | None = None) -> "Pages":
        """Pages holding ``rows`` (a tensor the caller owns: it becomes the page when it fits in one)."""
        pages = cls(size)
        if rows is not None and length(rows):
            pages.append(rows)
        return pages

    def append(self, rows: Rows) -> None:
        """Add ``rows`` after the last token: the last page is filled up (one copy of it), then
        new pages take the rest. Nothing held before the last page moves."""
        count = length(rows)
        if not count:
            return
        if self.pages and isinstance(rows, Tensor) and rows.dtype != self.pages[0].dtype:
            # States widened (a window beyond float16's range): every page takes the wider dtype,
            # as one tensor would, so what is held does not depend on the page size.
            wider = torch.promote_types(rows.dtype, self.pages[0].dtype)
            self.pages, rows = [page.to(wider) for page in self.pages], rows.to(wider)
        start = 0
        if self.pages and length(self.pages[-1]) < self.size:
            start = min(self.size - length(self.pages[-1]), count)
            self.pages[-1] = concat([self.pages[-1], _slice(rows, 0, start)])
        while start < count:
            stop = min(start + self.size, count)
            # A copy unless it is all of `rows`: a view would keep the whole of `rows` allocated.
            page = rows if (start, stop) == (0, count) else _map(_slice(rows, start, stop), Tensor.clone)
            self.pages.append(page)
            start = stop
        self.length += count

    def whole(self) -> Rows | None:
        """Every row as one tensor (or Encoded): the page itself when there is one."""
        if not self.pages:
            return None
        return self.pages[0] if len(self.pages) == 1 else concat(self.pages)

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` (an indexing of dim 0: beams, batch selection) to every tensor held."""
        self.pages = [_map(page, fn) for page in self.pages]


def _slice(rows: Rows, start: int, stop: int) -> Rows:
    return _map(rows, lambda t: t[:, :, start:stop])


def _map(rows: Rows, fn: Callable[[Tensor], Tensor]) -> Rows:
    if isinstance(rows, Tiered):
        return rows.map(fn)
    if isinstance(rows, Encoded):
        return dataclasses.replace(rows, codes=fn(rows.codes), scales=fn(rows.scales))
    return fn(rows)


def take(rows: Rows | None, index: Tensor) -> Rows | None:
    """Gather tokens (dim 2) per batch row and head: index [B, H, K]."""
    if rows is None:
        return None
    if isinstance(rows, Tiered):
        return rows.take(index)
    if isinstance(rows, Encoded):
        return dataclasses.replace(rows, codes=take(rows.codes, index), scales=torch.gather(rows.scales, 2, index))
    return torch.gather(rows, 2, index[..., None].expand(*index.shape, rows.shape[-1]))


def length(rows: Rows | None) -> int:
    if rows is None:
        return 0
    return rows.shape[-2] if isinstance(rows, Tensor) else rows.scales.shape[-1]


def concat(parts: list[Rows | None]) -> Rows | None:
    """The rows of ``parts`` one after another (None and empty parts skipped)."""
    parts = [part for part in parts if length(part)]
    if len(parts) <= 1:
        return parts[0] if parts else None
    if isinstance(parts[0], Tiered):
        return Tiered.concat(parts)
    if isinstance(parts[0], Encoded):
        return join(parts, 2)
    return torch.cat(parts, dim=2)
