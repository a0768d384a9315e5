"""One full-attention layer of a NexusQuantCache, following transformers' cache-layer contract.

Keys and values are each a :class:`KVStream`: old tokens (packed codes, or full precision at 16
bits) followed by a full-precision window of the newest tokens. ``update`` returns every stored
state plus the new ones, exactly what this forward's attention needs, and leaves the layer
*unsettled*. The next access (the next forward's mask, ``update``, ``stats``) settles it first:
tokens that left the window are scored, the lowest-ranked are evicted if the layer is over
budget, and the survivors are encoded. So the current forward never sees its own tokens
quantized or dropped, attention-based scores from this forward are in before eviction, and a
token is encoded at most once (evicted tokens never are).

Counts the contract relies on: ``get_seq_length()`` is tokens *seen*; ``get_mask_sizes(q)`` is
``(stored + q, seen - stored)``; every layer and every KV head stores the same number of tokens.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .codec import Encoded, decode, encode
from .config import NexusQuantConfig
from .policy import PAD, select_kept
from .scoring import attention_scores, key_norm_scores

__all__ = ["KVStream", "NexusQuantLayer", "PENDING_LAYER"]

# The layer whose `update` ran last in this context and the keys it returned: the attention
# function that runs right after it (integration.py) hands that layer the real queries.
PENDING_LAYER: ContextVar[tuple["NexusQuantLayer", Tensor] | None] = ContextVar("nexusquant_pending", default=None)

ATTENTION_SCORERS = ("snapkv", "h2o")
SNAPKV_POOL = 7


class KVStream:
    """Keys or values of one layer: ``old`` tokens (an Encoded with codes [B, H, T_old, d*bits/8]
    and scales [B, H, T_old], or a [B, H, T_old, d] tensor at 16 bits) then ``recent`` [B, H, T_recent, d].

    With ``center``, codes hold ``state - offset``, where ``offset`` [B, H, 1, d] is the mean of
    the first tokens encoded, per head: a large shared mean (keys' channel offsets) would
    otherwise eat the codebook's range."""

    def __init__(self, bits: int, config: NexusQuantConfig, center: bool = False):
        self.bits = bits
        self.config = config
        self.center = center and bits < 16
        self.old: Encoded | Tensor | None = None
        self.recent: Tensor | None = None
        self.offset: Tensor | None = None

    @property
    def old_length(self) -> int:
        return _length(self.old)

    @property
    def length(self) -> int:
        return self.old_length + (0 if self.recent is None else self.recent.shape[-2])

    def append(self, states: Tensor) -> Tensor:
        """Add ``states`` [B, H, q, d]; return every stored state, the new ones last."""
        self.recent = states if self.recent is None else torch.cat([self.recent, states], dim=-2)
        if self.old is None:
            return self.recent
        if isinstance(self.old, Encoded):
            old = decode(self.old) if self.offset is None else decode(self.old) + self.offset
        else:
            old = self.old
        return torch.cat([old, self.recent], dim=-2)

    def retire(self, leaving: int, keep: Tensor | None) -> None:
        """Move the ``leaving`` oldest recent tokens into ``old``, keeping only the candidates
        (old tokens, then leaving ones) indexed by ``keep`` [B, H, K] (ascending; None: all)."""
        # A copy, not a view: a view would keep the whole pre-retirement window allocated.
        moving, self.recent = self.recent[..., :leaving, :], self.recent[..., leaving:, :].clone()
        old_length = self.old_length
        if keep is None:
            self.old = _cat(self.old, self._store(moving))
            return
        # Sorted indices list kept old tokens first: per head, n_old of them, then the leaving ones.
        n_old = (keep < old_length).sum(-1, keepdim=True)  # [B, H, 1]
        rank = torch.arange(keep.shape[-1], device=keep.device)
        n_moving = int((keep.shape[-1] - n_old).max()) if leaving else 0
        # Only the leaving tokens some head keeps are encoded: per head, padded to the longest list.
        pick = torch.gather(keep, -1, (n_old + rank[:n_moving]).clamp(max=keep.shape[-1] - 1)) - old_length
        fresh = self._store(_take(moving, pick.clamp(0, max(leaving - 1, 0))))
        where = torch.where(rank < n_old, keep, old_length + rank - n_old)
        self.old = _take(_cat(self.old, fresh), where)

    def drop_oldest(self, count: int) -> None:
        """Forget the ``count`` oldest tokens (a sliding window moving on)."""
        from_old = min(count, self.old_length)
        if from_old:
            self.old = _take(self.old, _arange_like(self.old, from_old))
        if count > from_old:
            self.recent = self.recent[..., count - from_old :, :].clone()

    def _store(self, states: Tensor) -> Encoded | Tensor:
        if self.bits == 16 or states.shape[-2] == 0:
            return states
        if self.center:
            if self.offset is None:
                self.offset = states.float().mean(-2, keepdim=True).to(states.dtype)
            states = states - self.offset
        return encode(states, self.bits, self.config.method, self.config.seed)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (an indexing of dim 0) to every tensor held."""
        if self.recent is not None:
            self.recent = fn(self.recent)
        if isinstance(self.old, Encoded):
            self.old = dataclasses.replace(self.old, codes=fn(self.old.codes), scales=fn(self.old.scales))
        elif self.old is not None:
            self.old = fn(self.old)
        if self.offset is not None:
            self.offset = fn(self.offset)

    def nbytes(self) -> dict[str, int]:
        parts = {"codes": 0, "scales": 0, "window": _bytes(self.recent), "metadata": _bytes(self.offset)}
        if isinstance(self.old, Encoded):
            parts["codes"], parts["scales"] = _bytes(self.old.codes), _bytes(self.old.scales)
        else:
            parts["window"] += _bytes(self.old)  # 16-bit old tokens are full precision too
        return parts

    def numel(self, tokens: int) -> int:
        """Numbers a full-precision cache holds for ``tokens`` tokens of this stream."""
        batch, heads, _, dim = self.recent.shape
        return batch * heads * tokens * dim


def _take(x: Encoded | Tensor | None, index: Tensor) -> Encoded | Tensor | None:
    """Gather tokens (dim 2) per batch row and head: index [B, H, K]."""
    if x is None:
        return None
    if isinstance(x, Encoded):
        return dataclasses.replace(x, codes=_take(x.codes, index), scales=torch.gather(x.scales, 2, index))
    return torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))


def _arange_like(x: Encoded | Tensor, start: int) -> Tensor:
    """Token indices start..T_old-1 for every batch row and head of ``x``, as [B, H, T_old - start]."""
    scales = x.scales if isinstance(x, Encoded) else x[..., 0]
    index = torch.arange(start, scales.shape[-1], device=scales.device)
    return index.expand(*scales.shape[:-1], -1)


def _length(x: Encoded | Tensor | None) -> int:
    if x is None:
        return 0
    return x.scales.shape[-1] if isinstance(x, Encoded) else x.shape[-2]


def _cat(first: Encoded | Tensor | None, second: Encoded | Tensor | None) -> Encoded | Tensor | None:
    if _length(first) == 0:
        return second
    if _length(second) == 0:
        return first
    if isinstance(first, Encoded):
        return dataclasses.replace(
            first,
            codes=torch.cat([first.codes, second.codes], dim=-2),
            scales=torch.cat([first.scales, second.scales], dim=-1),
        )
    return torch.cat([first, second], dim=-2)


def _keep(stats: Tensor | None, keep: Tensor, candidates: int) -> Tensor | None:
    """Per-token statistics [B, H, T] after eviction: the kept candidates, then the rest."""
    if stats is None:
        return None
    return torch.cat([stats.gather(-1, keep), stats[..., candidates:]], -1)


def _bytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _positions(query_length: int, seen: int, kwargs: dict, device: torch.device) -> Tensor:
    """Original positions [B or 1, q] of the new tokens; left padding is marked PAD.

    transformers gives padding the same position as the token after it, so a token whose
    position is not below the next one's is padding."""
    position_ids = kwargs.get("kwargs", kwargs).get("position_ids")
    if position_ids is None:
        return torch.arange(seen, seen + query_length, device=device)[None]
    position_ids = position_ids.to(device)
    padding = torch.zeros_like(position_ids, dtype=torch.bool)
    padding[:, :-1] = position_ids[:, :-1] >= position_ids[:, 1:]
    return position_ids.masked_fill(padding, PAD)


class NexusQuantLayer(CacheLayerMixin):
    """A full-attention layer that quantizes and evicts its old tokens.

    With ``sliding_window`` it is a sliding-window layer instead: it keeps the last
    ``sliding_window - 1`` tokens as transformers' ``DynamicSlidingWindowLayer`` does, quantizes
    those older than its full-precision window, and never evicts.
    """

    is_compileable = False
    # Neither quantization nor eviction can be undone, so assisted decoding's rollback is
    # refused (transformers then explains that this cache cannot be cropped).
    is_croppable = False

    def __init__(self, config: NexusQuantConfig, scorer: str | None = None, sliding_window: int | None = None):
        super().__init__()
        self.config = config
        self.scorer = scorer or config.scorer
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.evicts = config.evicts and not self.is_sliding
        self.reset()

    def reset(self) -> None:
        self.key_stream = KVStream(self.config.key_bits, self.config, center=self.config.center_keys)
        self.value_stream = KVStream(self.config.value_bits, self.config)
        self.positions: Tensor | None = None  # int32 [B, H, T_stored], only when evicting
        # float16 [B, H, T_stored], only when evicting by score (streaming ranks by position)
        self.scores: Tensor | None = None
        self.seen = 0
        self._unsettled = False
        self.is_initialized = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.settle()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.evicts:
            self._record(key_states, kwargs)
        self.seen += key_states.shape[-2]
        keys, values = self.key_stream.append(key_states), self.value_stream.append(value_states)
        self._unsettled = True
        if self.evicts and self.scorer in ATTENTION_SCORERS:
            PENDING_LAYER.set((self, keys))  # the attention function takes it right away
        return keys, values

    def _record(self, key_states: Tensor, kwargs: dict) -> None:
        batch, heads, length, _ = key_states.shape
        positions = _positions(length, self.seen, kwargs, key_states.device).to(torch.int32)
        positions = positions[:, None].expand(batch, heads, length).contiguous()  # per head once evicting
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        if self.scorer == "streaming":
            return
        if self.scorer == "keynorm":
            scores = key_norm_scores(key_states).half()
        else:
            scores = torch.zeros(batch, heads, length, dtype=torch.float16, device=key_states.device)  # see observe()
        self.scores = scores if self.scores is None else torch.cat([self.scores, scores], -1)

    def observe(self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float) -> None:
        """Add the attention this forward's queries [B, Hq, q, d] paid to ``keys`` [B, Hkv, S, d],
        the states ``update`` returned."""
        if not self.evicts or self.scorer not in ATTENTION_SCORERS:
            return
        length = query.shape[-2]
        if self.scorer == "snapkv":
            # An exponential window of about `observation_window` queries: stale votes fade, so
            # tokens that arrived late are not outvoted by the sheer age of older ones.
            window = self.config.observation_window
            self.scores.mul_((1 - 1 / window) ** length)
            self.scores += attention_scores(query, keys, attention_mask, scaling, window, SNAPKV_POOL)
        else:
            self.scores += attention_scores(query, keys, attention_mask, scaling, length, 1)

    def settle(self) -> None:
        """Retire tokens that left the window: evict down to the budget, encode the survivors."""
        if not self._unsettled:
            return
        self._unsettled = False
        config = self.config
        if self.is_sliding and (beyond := self.key_stream.length - (self.sliding_window - 1)) > 0:
            self.key_stream.drop_oldest(beyond)
            self.value_stream.drop_oldest(beyond)
        recent = self.key_stream.recent.shape[-2]
        leaving = recent - config.recent_window if recent >= config.recent_window + config.block_size else 0
        keep = None
        if self.evicts:
            candidates = self.key_stream.old_length + leaving
            excess = self.key_stream.length - config.budget(self.seen)
            if excess >= config.block_size or (excess > 0 and leaving):
                ranking = self.positions if self.scores is None else self.scores
                keep = select_kept(
                    ranking[..., :candidates],
                    self.positions[..., :candidates],
                    max(candidates - excess, 0),
                    config.sink_tokens,
                )
                self.positions = _keep(self.positions, keep, candidates)
                self.scores = _keep(self.scores, keep, candidates)
        if leaving or keep is not None:
            self.key_stream.retire(leaving, keep)
            self.value_stream.retire(leaving, keep)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        self.settle()
        stored = self.key_stream.length
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def baseline_numel(self) -> int:
        """Numbers a 16-bit DynamicCache layer of the same kind holds for the tokens seen."""
        tokens = self.seen if not self.is_sliding else min(self.seen, self.sliding_window - 1)
        return self.key_stream.numel(tokens) + self.value_stream.numel(tokens)

    def offload(self):
        pass  # the compressed layer is small; it stays where it is

    def prefetch(self):
        pass

    def _map_batch(self, fn) -> None:
        self.settle()
        self.key_stream.map_batch(fn)
        self.value_stream.map_batch(fn)
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.scores is not None:
            self.scores = fn(self.scores)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> dict[str, int]:
        """Bytes held by part: codes, scales, full-precision window, positions and statistics."""
        self.settle()
        keys, values = self.key_stream.nbytes(), self.value_stream.nbytes()
        parts = {part: keys[part] + values[part] for part in keys}
        parts["metadata"] += _bytes(self.positions) + _bytes(self.scores)
        return parts
