"""Which tokens a layer keeps when it must evict."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PAD", "evicted", "merge_targets", "select_kept"]

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


def evicted(keep: Tensor, candidates: int) -> Tensor:
    """Indices [B, H, N - K] of the candidates that ``keep`` [B, H, K] (from select_kept) drops, ascending."""
    dropped = torch.ones(*keep.shape[:-1], candidates, dtype=torch.bool, device=keep.device)
    dropped.scatter_(-1, keep, False)
    return dropped.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., : candidates - keep.shape[-1]]


def merge_targets(evicted_keys: Tensor, target_keys: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """For each evicted token, the allowed target with the most similar key (cosine).

    Args:
        evicted_keys: [B, H, E, d].
        target_keys: [B, H, T, d].
        allowed: [B, H, T] bool, the targets that may absorb a token.

    Returns:
        target index [B, H, E] and whether a target exists [B, H, E] (a head may allow none).
    """
    similarity = torch.nn.functional.normalize(evicted_keys.float(), dim=-1) @ torch.nn.functional.normalize(
        target_keys.float(), dim=-1
    ).transpose(-1, -2)
    best, target = similarity.masked_fill(~allowed[..., None, :], float("-inf")).max(-1)
    return target, best > float("-inf")
