"""Which tokens a layer keeps when it must evict."""

from __future__ import annotations

from torch import Tensor

__all__ = ["PAD", "select_kept"]

PAD = -1  # the position recorded for padding tokens: they are evicted first


def select_kept(scores: Tensor, positions: Tensor, keep: int, sink_tokens: int) -> Tensor:
    """Indices of the ``keep`` tokens to keep, ascending, the same count for every KV head.

    Args:
        scores: [B, H, N], higher = more important.
        positions: [B, H, N] original positions; ``PAD`` marks padding.
        keep: how many of the N candidates survive.
        sink_tokens: tokens at positions below this are kept first (attention sinks).

    Returns:
        [B, H, keep] int64, sorted, so kept tokens stay in their original order (which keeps
        transformers' padding mask exact, see transformers-contract.md).
    """
    priority = scores.float().masked_fill(positions == PAD, float("-inf"))
    priority = priority.masked_fill((positions >= 0) & (positions < sink_tokens), float("inf"))
    return priority.topk(keep, dim=-1).indices.sort(-1).values
