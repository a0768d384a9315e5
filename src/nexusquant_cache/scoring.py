"""Token importance for eviction, from queries or from keys alone.

Scores are per KV head: with grouped-query attention every query head of a group votes for its
KV head (the mean over the group), so one ranking serves the heads that share a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_scores", "key_norm_scores", "weight_scores"]

_QUERY_CHUNK = 256  # bounds the [B, H, chunk, S] attention matrix held at once


def attention_scores(
    query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float, window: int, pool: int
) -> Tensor:
    """Attention mass each key receives from the last ``window`` queries.

    Args:
        query: [B, Hq, q, d], post-RoPE.
        keys: [B, Hkv, S, d], every key this forward attended to (the last q are the queries' own).
        attention_mask: the mask given to attention: bool [B, 1, q, S] (True = attend), an
            additive float mask ([B, 1 or Hq, q, S]), or None for plain causal attention.
        scaling: the softmax scale.
        window: how many of the last queries vote.
        pool: max-pooling width along the keys (SnapKV keeps neighbours of important tokens); 1 = none.

    Returns:
        [B, Hkv, S] float32.
    """
    batch, query_heads, length, dim = query.shape
    kv_heads, stored = keys.shape[1], keys.shape[2]
    keys = keys.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, d, S]
    scores = torch.zeros(batch, kv_heads, stored, device=query.device)
    for start in range(length - min(window, length), length, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, length)
        voters = query[:, :, start:stop].float().view(batch, kv_heads, query_heads // kv_heads, stop - start, dim)
        logits = voters @ keys * scaling  # [B, Hkv, g, chunk, S]
        if attention_mask is None:
            # query i sits at absolute index stored - length + i and sees the keys up to it
            rows = torch.arange(stored - length + start, stored - length + stop, device=query.device)[:, None]
            logits = logits.masked_fill(torch.arange(stored, device=query.device) > rows, float("-inf"))
        else:
            mask = attention_mask[..., start:stop, -stored:]  # [B, 1 or Hq, chunk, S]
            mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(batch, kv_heads, -1, *mask.shape[-2:])
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        weights = torch.nan_to_num(logits.softmax(-1))  # a fully masked query row votes for nothing
        scores += weights.mean(2).sum(2)
    return _pooled(scores, pool)


def weight_scores(weights: Tensor, window: int, pool: int) -> Tensor:
    """As :func:`attention_scores`, from the attention weights [B, Hkv, g, q, S] a forward computed."""
    return _pooled(weights[..., -window:, :].mean(2).sum(2), pool)


def _pooled(scores: Tensor, pool: int) -> Tensor:
    if pool > 1:
        scores = F.max_pool1d(scores.flatten(0, 1)[:, None], pool, stride=1, padding=pool // 2).view_as(scores)
    return scores


def key_norm_scores(keys: Tensor) -> Tensor:
    """Importance without queries: keys of small norm tend to receive more attention (as in
    KNorm, Devoto et al. 2024). keys [B, H, q, d] -> [B, H, q] float32, higher = keep."""
    return -keys.float().norm(dim=-1)
