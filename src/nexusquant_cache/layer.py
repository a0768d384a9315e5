"""One full-attention layer of a NexusQuantCache, following transformers' cache-layer contract.

Keys and values are each a :class:`KVStream`: old tokens (packed codes, or full precision at 16
bits) followed by a full-precision window of the newest tokens. ``update`` returns every stored
state plus the new ones, exactly what this forward's attention needs, and leaves the layer
*unsettled*. The next access (the next forward's mask, ``update``, ``stats``) settles it first:
tokens that left the window are scored, the lowest-ranked are evicted if the layer is over
budget, and the survivors are encoded; with demotion (``full_bits_ratio``), the lowest-ranked
old tokens over that budget then drop to 2 bits. So the current forward never sees its own tokens
quantized or dropped, attention-based scores from this forward are in before eviction, and a
token is encoded at most once (evicted tokens never are; demotion drops a stage, no encode).

Decode steps (at most ``ROTATED_QUERIES`` tokens) of a model whose attention runs through ours
skip the decoding: ``update`` returns only the window's states, and the attention function calls
``attend``, which reads the old tokens' codes in the codec's rotated domain (attention.py).

Counts the contract relies on: ``get_seq_length()`` is tokens *seen*; ``get_mask_sizes(q)`` is
``(stored + q, seen - stored)``; every layer and every KV head stores the same number of tokens.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .attention import Codes, Scratch, StoredKeys, attend, biased_mask, codes_of
from .codec import SUPPORTED_DTYPES, Encoded, Tiered, decode, encode, vector_nbytes
from .codec.encoding import SCALE_DTYPE
from .conditioning import GUARD_FACTOR, KeyConditioning, Rope, fit_key_conditioning, guard_limit, logit_error
from .config import NexusQuantConfig
from .pages import Pages, concat, length, take
from .policy import PAD, evicted, merge_targets, select_kept
from .scoring import attention_scores, key_norm_scores, weight_scores

if TYPE_CHECKING:
    from .allocation import ByteBudget

__all__ = ["KVStream", "NexusQuantLayer", "PENDING_LAYER"]

# The layer whose `update` ran last in this context and the keys it returned: the attention
# function that runs right after it (integration.py) hands that layer the real queries.
PENDING_LAYER: ContextVar[tuple["NexusQuantLayer", Tensor] | None] = ContextVar("nexusquant_pending", default=None)

ATTENTION_SCORERS = ("snapkv", "h2o")
# Forwards of at most this many tokens (decode steps) attend in the rotated domain when the
# model's attention runs through ours; longer ones (prefill chunks) decode the old tokens and
# run SDPA, whose memory does not grow with queries x tokens.
ROTATED_QUERIES = 16
_FLOAT16_MAX = torch.finfo(torch.float16).max
SNAPKV_POOL = 7
MERGE_BIAS_LOST = (
    "NexusQuantCache: the model's attention no longer runs through the cache's, so merged tokens "
    "(`merge_bias`) attend without their logit bias"
)
_MAX_LOGIT_BIAS = 31 * 0.6931471805599453  # log 2^31: a merged token stands for fewer tokens than a layer can see


class KVStream:
    """Keys or values of one layer: ``old`` tokens (an Encoded with codes [B, H, T_old, d*bits/8]
    and scales [B, H, T_old], or a [B, H, T_old, d] tensor at 16 bits) then ``recent`` [B, H, T_recent, d].

    A ``conditioned`` stream (keys) fits a :class:`KeyConditioning` on the first tokens it
    encodes and also stores the tokens at positions below ``exact_tokens`` (the attention sinks)
    exactly: nearly every query attends to them, so their error shifts every logit. Slot p of
    ``exact`` holds the token at position p, ``exact_index`` its index among the old tokens
    (-1: none yet), so left padding and eviction move nothing. Before that first
    encode, ``queries`` may hold the model's latest queries: they pick the per-channel scale and
    let the guard measure the logit error; where that error is far beyond the codec's normal
    error (``guard_limit``), the stream keeps its old tokens at full precision instead
    (``guarded``). ``positions()`` gives the positions of the stored tokens (RoPE needs them).

    A quantized stream of a float32 (or float64) model holds its window in float16: the window
    is a large part of a compressed cache, and float16's rounding is far below the codes' error
    (bfloat16's was not, on Gemma 3's keys with channel offsets near 40). The forward that adds
    tokens still sees them exact; a value beyond float16's range keeps the window at full width.
    At 16 bits nothing is rounded."""

    def __init__(
        self,
        bits: int,
        config: NexusQuantConfig,
        conditioned: bool = False,
        exact_tokens: int = 0,
        tiered: bool = False,
    ):
        self.bits = bits
        self.config = config
        self.tiered = tiered and bits == 4  # old tokens held as a Tiered: each at 4 bits or demoted to 2
        self.conditioned = conditioned and bits < 16
        self.exact_tokens = exact_tokens if self.conditioned else 0
        self.pages = Pages()  # the old tokens
        self.recent: Tensor | None = None
        self.conditioning: KeyConditioning | None = None
        self.exact: Tensor | None = None  # [B, H, exact_tokens, d]: the sinks' states, exact
        self.exact_index: Tensor | None = None  # int64 [B, H, exact_tokens]: where they are in old, or -1
        self._sinks_held: bool | None = None  # whether no slot is -1; None: not known since the last change
        self.rope: Rope | None = None
        self.queries: Tensor | None = None
        self.guarded: bool = False
        self.logit_error: list[float] | None = None  # per head, measured by the first encode
        self.positions: Callable[..., Tensor] | None = None  # (start, stop) -> positions of stored tokens
        self.dtype: torch.dtype | None = None  # the model's: what append returns and codes decode to
        self.name = "a layer"  # how warnings name the layer

    @property
    def old(self) -> Encoded | Tensor | None:
        """The old tokens as one Encoded (codes [B, H, T_old, d*bits/8], scales [B, H, T_old]) or
        one [B, H, T_old, d] tensor at 16 bits (joined from the pages: a copy when there are several)."""
        return self.pages.whole()

    @property
    def old_length(self) -> int:
        return self.pages.length

    def _holds_codes(self) -> bool:
        return bool(self.pages.pages) and _is_codes(self.pages.pages[0])

    @property
    def wants_queries(self) -> bool:
        """Whether the first encode, which fits the conditioning and runs the guard, is still to come."""
        return self.bits < 16 and not self.pages.length

    @property
    def length(self) -> int:
        return self.old_length + (0 if self.recent is None else self.recent.shape[-2])

    def append(self, states: Tensor, with_old: bool = True) -> Tensor:
        """Add ``states`` [B, H, q, d]; return every stored state, the new ones last (exact), or
        only the window's (``with_old`` false: attention reads the old tokens as codes)."""
        self.dtype = states.dtype
        held = self.recent
        quantized = self.bits < 16 or self.guarded  # a guarded side keeps the float16 window it had
        narrow = quantized and states.element_size() > 2 and (held is None or held.dtype == torch.float16)
        if narrow and states.abs().amax() <= _FLOAT16_MAX:
            stored = states.half()
        else:  # a value beyond float16's range: this stream's window stays at full width from now on
            stored, held = states, None if held is None else held.to(states.dtype)
        if held is None and stored.untyped_storage().nbytes() > _bytes(stored):
            stored = stored.clone()  # a view of a larger buffer (GPT-2's fused qkv) would keep it all alive
        self.recent = stored if held is None else torch.cat([held, stored], dim=-2)
        recent = states if held is None else torch.cat([held.to(states.dtype), states], dim=-2)
        if not self.pages.length or not with_old:
            return recent
        return torch.cat([self.old_states(), recent], dim=-2)

    def old_for_attention(self, scratch: Scratch, name: str) -> Codes | Tensor:
        """The old tokens as rotated-domain attention reads them: codes read into ``scratch``, or
        states in the model's dtype (16 bits, or kept exact by the guard)."""
        pages = self.pages.pages
        if self._holds_codes():
            return codes_of(pages, scratch, name)
        if len(pages) == 1:
            return pages[0].to(self.dtype)  # read in place when it is the model's dtype
        batch, heads, _, dim = pages[0].shape
        out = scratch.take(name, (batch, heads, self.old_length, dim), self.dtype, pages[0].device)
        return torch.cat(pages, dim=2, out=out)  # widened to the model's dtype in the same pass

    def stored_keys(self, scratch: Scratch) -> StoredKeys:
        """The old keys with what undoes their conditioning, for rotated-domain attention."""
        old = self.old_for_attention(scratch, "keys")
        if not isinstance(old, Codes):
            return StoredKeys(old)
        conditioning = self.conditioning
        positions = self._old_positions() if conditioning is not None and conditioning.rope is not None else None
        held = self.exact is not None and self._all_sinks_held()
        return StoredKeys(old, conditioning, positions, self.exact, self.exact_index, held)

    def old_states(self) -> Tensor:
        """The old tokens [B, H, T_old, d] as attention sees them, in the model's dtype."""
        old = self.old
        return self._decode(old, None) if _is_codes(old) else old.to(self.dtype)

    def _decode(self, old: Encoded | Tiered, index: Tensor | None) -> Tensor:
        """States of the old tokens ``old`` (all of them, or those at ``index`` [B, H, K] when
        gathered), in the model's dtype: conditioning undone, exact tokens put back."""
        states = old.decode() if isinstance(old, Tiered) else decode(old)
        if self.conditioning is not None:
            positions = self._old_positions()
            if index is not None and self.conditioning.rope is not None:
                positions = torch.gather(positions.expand(*index.shape[:2], -1), -1, index)
            states = self.conditioning.inverse(states, positions, reuse=True).to(self.dtype)
        else:
            states = states.to(self.dtype)
        if self.exact is not None:
            exact = self.exact.to(states.dtype)
            if index is None and self._all_sinks_held():  # the usual case: one scatter, no host sync
                states.scatter_(-2, self.exact_index[..., None].expand_as(exact), exact)
            elif index is None:
                batch, head, slot = (self.exact_index >= 0).nonzero(as_tuple=True)
                states[batch, head, self.exact_index[batch, head, slot]] = exact[batch, head, slot]
            else:
                match = index[..., :, None] == self.exact_index[..., None, :]  # [B, H, K, slots]
                rows = take(exact, match.to(torch.int8).argmax(-1))
                states = torch.where(match.any(-1)[..., None], rows, states)
        return states

    def _all_sinks_held(self) -> bool:
        """Whether every slot of ``exact`` holds a token (asked once per change of ``exact_index``)."""
        if self._sinks_held is None:
            self._sinks_held = bool((self.exact_index >= 0).all())
        return self._sinks_held

    def _old_positions(self) -> Tensor:
        """Positions [B or 1, H or 1, T_old] of the old tokens (only asked for when RoPE is known)."""
        if self.conditioning is None or self.conditioning.rope is None:
            return torch.zeros(1, 1, 1)  # not used: the offset does not depend on the position
        return self.positions(0, self.old_length)

    def retire(self, leaving: int, keep: Tensor | None) -> None:
        """Move the ``leaving`` oldest recent tokens into ``old``, keeping only the candidates
        (old tokens, then leaving ones) indexed by ``keep`` [B, H, K] (ascending; None: all).
        ``positions()`` must still list the candidates first."""
        old_length = self.old_length
        moving_positions = self.positions(old_length, old_length + leaving) if self._needs_positions() else None
        # A copy, not a view: a view would keep the whole pre-retirement window allocated.
        moving, self.recent = self.recent[..., :leaving, :], self.recent[..., leaving:, :].clone()
        if keep is None:
            fresh = self._store(moving, moving_positions)
            if self.exact_tokens and self.bits < 16:
                index = old_length + torch.arange(leaving, device=moving.device)
                self._keep_sinks(moving, moving_positions, index.expand(*moving.shape[:2], -1))
            self.pages.append(fresh)  # rewrites the last page only
            return
        # Sorted indices list kept old tokens first: per head, n_old of them, then the leaving ones.
        n_old = (keep < old_length).sum(-1, keepdim=True)  # [B, H, 1]
        rank = torch.arange(keep.shape[-1], device=keep.device)
        n_moving = int((keep.shape[-1] - n_old).max()) if leaving else 0
        # Only the leaving tokens some head keeps are encoded: per head, padded to the longest list.
        pick = torch.gather(keep, -1, (n_old + rank[:n_moving]).clamp(max=keep.shape[-1] - 1)) - old_length
        pick = pick.clamp(0, max(leaving - 1, 0))
        picked = take(moving, pick)
        picked_positions = None
        if moving_positions is not None:
            picked_positions = torch.gather(moving_positions.expand(*pick.shape[:2], -1), -1, pick)
        where = torch.where(rank < n_old, keep, old_length + rank - n_old)
        fresh = self._store(picked, picked_positions)
        self.pages = Pages.of(take(concat([*self.pages.pages, fresh]), where), self.pages.size)
        if self.exact is not None:  # follow the kept sinks to their new indices (sinks are never evicted)
            new = torch.searchsorted(where, self.exact_index.clamp(min=0)).clamp(max=where.shape[-1] - 1)
            found = (self.exact_index >= 0) & (where.gather(-1, new) == self.exact_index)
            self.exact_index, self._sinks_held = torch.where(found, new, -1), None
        if self.exact_tokens and self.bits < 16 and n_moving:
            # Picked row r lands at index n_old + r; rows beyond a head's count only pad the list.
            index = n_old + rank[:n_moving]
            valid = index < keep.shape[-1]
            positions = index if picked_positions is None else picked_positions
            self._keep_sinks(picked, positions.masked_fill(~valid, -1), index)

    def _keep_sinks(self, states: Tensor, positions: Tensor | None, index: Tensor) -> None:
        """Store exactly those of ``states`` [B, H, M, d] whose ``positions`` are below
        ``exact_tokens``, at slot = position, with their ``index`` [B, H, M] among the old tokens."""
        batch, heads, count, dim = states.shape
        slots = self.exact_tokens
        if self.exact is None:
            # As the window holds them (float16 for a float32 model): a wider copy would gain nothing.
            self.exact = torch.zeros(batch, heads, slots, dim, dtype=states.dtype, device=states.device)
            self.exact_index = torch.full((batch, heads, slots), -1, dtype=torch.long, device=states.device)
        if positions is None:  # no positions known: the first stored tokens are the sinks
            positions = index
        positions = positions.expand(batch, heads, count)
        sink = (positions >= 0) & (positions < slots)
        if not sink.any():
            return
        b, h, m = sink.nonzero(as_tuple=True)
        slot = positions[b, h, m].long()
        self.exact[b, h, slot] = states[b, h, m].to(self.exact.dtype)
        self.exact_index[b, h, slot] = index.expand(batch, heads, count)[b, h, m].long()
        self._sinks_held = None

    def gather(self, index: Tensor, leaving: int) -> Tensor:
        """States [B, H, E, d] of the candidates ``index`` [B, H, E] (old tokens, then the
        ``leaving`` oldest window tokens), in the model's dtype; only the old ones asked for are decoded."""
        old_length = self.old_length
        from_window = self.recent[..., :leaving, :].to(self.dtype)
        states = take(from_window, (index - old_length).clamp(0, max(leaving - 1, 0))) if leaving else None
        if old_length:
            inside = index.clamp(max=old_length - 1)
            old = take(self.old, inside)
            old = self._decode(old, inside) if _is_codes(old) else old.to(self.dtype)
            states = old if states is None else torch.where((index < old_length)[..., None], old, states)
        return states

    def merge_into_window(self, target: Tensor, states: Tensor, weights: Tensor, target_weights: Tensor) -> None:
        """Replace each window token t among the first T by the weighted mean of itself
        (``target_weights`` [B, H, T]) and the ``states`` [B, H, E, d] whose ``target`` [B, H, E] is t."""
        length = target_weights.shape[-1]
        window = self.recent[..., :length, :]
        total = torch.scatter_add(target_weights.float(), -1, target, weights)
        summed = window.float() * target_weights[..., None].float()
        summed.scatter_add_(-2, target[..., None].expand_as(states), states.float() * weights[..., None])
        merged = summed / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        # Only tokens that absorbed something change (w * x / w need not round back to x).
        absorbed = torch.zeros_like(total).scatter_add_(-1, target, (weights > 0).float()) > 0
        merged = torch.where(absorbed[..., None], merged, window).to(self.recent.dtype)
        # Not in place: the window may be an inference tensor while this runs outside inference mode.
        self.recent = torch.cat([merged, self.recent[..., length:, :]], dim=-2)

    def drop_oldest(self, count: int) -> None:
        """Forget the ``count`` oldest tokens (a sliding window moving on)."""
        from_old = min(count, self.old_length)
        if from_old:
            old = self.old
            self.pages = Pages.of(take(old, _arange_like(old, from_old)), self.pages.size)
        if count > from_old:
            self.recent = self.recent[..., count - from_old :, :].clone()

    def _needs_positions(self) -> bool:
        """Whether encoding needs the tokens' positions: to find the sinks, or for RoPE-aware conditioning."""
        return self.bits < 16 and (bool(self.exact_tokens) or self._rope_held() is not None)

    def _store(self, states: Tensor, positions: Tensor | None) -> Encoded | Tensor:
        # Full-precision states are copied: a view would keep the whole old window allocated.
        if self.bits == 16 or states.shape[-2] == 0:
            return states.clone()
        window = states
        states = states.to(self.dtype)  # a float16 window encodes as the model's dtype
        if self.conditioning is None and (self.conditioned or self.queries is not None):
            self._fit(states, positions)
            if self.guarded:
                return window.clone()  # as the window held it: widening float16 to float32 would gain nothing
        if self.conditioning is not None:
            states = self.conditioning.forward(states, positions)
        encoded = encode(states, self.bits, self.config.method, self.config.seed, self.config.scale_bits)
        return Tiered.of(encoded) if self.tiered else encoded

    def above_2_bits(self) -> Tensor:
        """bool [B, H, T_old]: which old tokens of a Tiered side still hold their second stage."""
        return torch.cat([page.full for page in self.pages.pages], -1)

    def demote(self, mask: Tensor) -> None:
        """Hold the old tokens where ``mask`` [B, H, T_old] is set at 2 bits (a Tiered side's; others keep theirs)."""
        if self.tiered and self._holds_codes():
            self.pages = Pages.of(concat(self.pages.pages).demote(mask), self.pages.size)

    def _fit(self, states: Tensor, positions: Tensor | None) -> None:
        """Fit the conditioning on the first tokens encoded and run the guard where queries were seen."""
        rope = self.rope if positions is not None else None
        queries, self.queries = self.queries, None
        method, seed = self.config.method, self.config.seed
        if self.conditioned:
            self.conditioning, error = fit_key_conditioning(
                states, positions, rope, queries, self.bits, method, seed, self.exact_tokens
            )
        elif queries is not None:  # not conditioned: the guard still measures the plain codec
            identity = KeyConditioning(torch.zeros_like(states[..., :1, :], dtype=torch.float32))
            stride = max(1, states.shape[-2] // 256)
            counted = None if positions is None else (positions >= 0).expand(*states.shape[:-1])[..., ::stride]
            probe = states[..., ::stride, :]
            error = logit_error(queries, probe, identity, torch.zeros(1, 1, 1), self.bits, method, seed, counted)
        else:
            error = None
        if error is None:
            return
        self.logit_error = error.amax(0).tolist()
        limit = guard_limit(self.bits, method)
        if max(self.logit_error) > limit:
            times = max(self.logit_error) / (limit / GUARD_FACTOR)
            warnings.warn(
                f"NexusQuantCache: {self.name}'s {self.bits}-bit keys would distort its attention logits {times:.0f}x "
                "beyond the codec's normal error; that layer keeps its keys at full precision "
                "(see stats()['guarded_layers'])",
                stacklevel=2,
            )
            self.guarded, self.bits, self.conditioning, self.exact_tokens = True, 16, None, 0

    def check_representable(self, dtype: torch.dtype) -> None:
        """Raise ValueError unless every state this stream would hand a model of ``dtype`` is finite
        in it (a loaded file's values are bounded for float32; float16's range is far smaller)."""
        self.dtype = dtype  # what the next append would set: the dtype decodes go to
        for name, states in (("recent", self.recent), ("exact", self.exact), ("old", self.old)):
            if states is None or length(states) == 0:
                continue
            states = self.old_states() if name == "old" else states
            if not torch.isfinite(states.to(dtype)).all():
                raise ValueError(f"{name} states are not finite in the model's {dtype}")

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (an indexing of dim 0) to every tensor held."""
        if self.recent is not None:
            self.recent = fn(self.recent)
        self.pages.map(fn)
        if self.exact is not None:
            self.exact, self.exact_index, self._sinks_held = fn(self.exact), fn(self.exact_index), None
        if self.queries is not None:
            self.queries = fn(self.queries)
        if self.conditioning is not None:
            self.conditioning.map_batch(fn)

    def nbytes(self) -> dict[str, int]:
        parts = {"codes": 0, "scales": 0, "window": _bytes(self.recent), "metadata": 0}
        old = self.pages.pages
        if self._holds_codes() and self.tiered:
            parts["codes"] = sum(_bytes(page.first.codes) + _bytes(page.second) for page in old)
            parts["scales"] = sum(_bytes(page.scales) for page in old)
            parts["metadata"] += sum(_bytes(page.packed_full) for page in old)  # which tokens are at 4 bits
        elif self._holds_codes():
            parts["codes"] = sum(_bytes(page.codes) for page in old)
            parts["scales"] = sum(_bytes(page.scales) for page in old)
        else:
            parts["window"] += sum(_bytes(page) for page in old)  # 16-bit old tokens are full precision too
        parts["metadata"] += sum(_bytes(tensor) for tensor in self._conditioning_tensors().values())
        return parts

    def planned_nbytes(self, old: int, window: int, full: int) -> int:
        """Bytes this stream holds with ``old`` old tokens (``full`` of them at 4 bits in a Tiered
        side, the rest at 2) and ``window`` in the window: what :meth:`nbytes` will count, for the
        byte budget (allocation.py). A first encode still to come adds its conditioning."""
        batch, heads, _, dim = self.recent.shape
        window_bytes = batch * heads * window * dim * self.recent.element_size()
        if self.bits == 16:  # at 16 bits, or kept exact by the guard: old tokens as the window holds them
            old_bytes = batch * heads * old * dim * self.recent.element_size()
        elif self.tiered:
            scale_bits = self.config.scale_bits
            second = vector_nbytes(dim, 4, scale_bits) - vector_nbytes(dim, 2, scale_bits)
            pages, rest = divmod(old, self.pages.size)
            mask = pages * -(-self.pages.size // 8) + -(-rest // 8)  # one bit per token, per page
            old_bytes = batch * heads * (old * vector_nbytes(dim, 2, scale_bits) + full * second + mask)
        else:
            old_bytes = batch * heads * old * vector_nbytes(dim, self.bits, self.config.scale_bits)
        return window_bytes + old_bytes + self._planned_conditioning_nbytes(old)

    def _planned_conditioning_nbytes(self, old: int) -> int:
        tensors = self._conditioning_tensors()
        if not old or self.pages.length:
            return sum(map(_bytes, tensors.values()))  # no first encode in the plan, or it is done
        held = sum(_bytes(tensor) for name, tensor in tensors.items() if name != "queries")  # they go at it
        if not self.conditioned or self.bits == 16:
            return held
        batch, heads, _, dim = self.recent.shape
        fitted = (2 if self.queries is not None else 1) * batch * heads * dim * 4  # float32 offset (+ channel scale)
        sinks = batch * heads * self.exact_tokens * (dim * self.recent.element_size() + 8)  # states and int64 index
        return held + fitted + sinks

    def numel(self, tokens: int) -> int:
        """Numbers a full-precision cache holds for ``tokens`` tokens of this stream."""
        batch, heads, _, dim = self.recent.shape
        return batch * heads * tokens * dim

    def _conditioning_tensors(self) -> dict[str, Tensor]:
        """The key conditioning's tensors, and what a fit still to come needs: the model's RoPE
        frequencies and the queries seen so far."""
        tensors = {"exact": self.exact, "exact_index": self.exact_index, "queries": self.queries}
        if self.conditioning is not None:
            tensors |= {"offset": self.conditioning.offset, "scale": self.conditioning.scale}
        if self._rope_held() is not None:
            tensors["rope_inv_freq"] = self.rope.inv_freq
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}

    def _rope_held(self) -> Rope | None:
        """The RoPE the conditioning uses (fitted) or will use (to come)."""
        if self.conditioning is not None:
            return self.conditioning.rope
        return self.rope if self.conditioned and self.bits < 16 else None

    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Every tensor held, by name (``codes``/``scales`` (and ``second``/``full`` when tiered)
        or ``old``, ``recent``, and the
        conditioning's ``offset``, ``scale``, ``exact``, ``exact_index``, ``rope_inv_freq``,
        ``queries``), and what :meth:`restore` needs besides them."""
        tensors = {"recent": self.recent, **self._conditioning_tensors()}
        rope = self._rope_held()
        state = {"bits": self.bits, "old": None, "guarded": self.guarded, "conditioned": self.conditioning is not None}
        state["rope_scaling"] = None if rope is None else rope.scaling
        if self.logit_error is not None:
            state["logit_error"] = self.logit_error
        old = self.old
        if _is_codes(old):
            tiered = isinstance(old, Tiered)
            codes = old.first if tiered else old  # a Tiered's first stages are a 2-bit Encoded
            tensors |= {"codes": codes.codes, "scales": codes.scales}
            if tiered:
                tensors |= {"second": old.second, "full": old.packed_full}
            state |= {"old": "tiered" if tiered else "codes", "method": codes.method.value, "seed": codes.seed}
            if codes.scale_bits == 8:
                state["octave"] = codes.octave  # what the log scales count down from
            state["dtype"] = str(codes.dtype).removeprefix("torch.")
        elif self.old_length:  # an empty 16-bit part is the same as none
            tensors["old"] = old
            state["old"] = "states"
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}, state

    def restore(self, tensors: dict[str, Tensor], state: dict) -> None:
        """Take back what :meth:`state_tensors` gave, once it is checked to fit this stream; a
        ValueError says what does not. Files of format version 1 hold at most a plain key
        ``offset`` (the mean key, before ``center_keys`` became automatic conditioning)."""
        if not isinstance(state, dict):
            raise ValueError(f"stream state must be a dict, not {state!r}")
        guarded = state.get("guarded", False)
        if not isinstance(guarded, bool) or state.get("bits") != (16 if guarded else self.bits):
            raise ValueError(
                f"holds {state.get('bits')}-bit states (guarded: {guarded!r}) but the config gives this stream "
                f"{self.bits} bits"
            )
        kind = state.get("old")
        if kind not in _OLD_TENSORS or (guarded and kind in ("codes", "tiered")):
            raise ValueError(f"old part {kind!r} is none of {list(_OLD_TENSORS)} (a guarded side holds no codes)")
        if kind in ("codes", "tiered") and (kind == "tiered") != self.tiered:
            raise ValueError(
                f"holds {'tiered' if kind == 'tiered' else 'plain'} codes but the config "
                f"{'demotes' if self.tiered else 'does not demote'} this side's tokens (full_bits_ratio)"
            )
        version_1 = "conditioned" not in state
        conditioned = "offset" in tensors if version_1 else state["conditioned"]
        rope_scaling = None if version_1 else state.get("rope_scaling")
        if not isinstance(conditioned, bool) or (conditioned or rope_scaling is not None) and not self.conditioned:
            raise ValueError(f"holds key conditioning ({conditioned!r}, RoPE {rope_scaling!r}) that this side has not")
        if guarded and (conditioned or rope_scaling is not None):
            raise ValueError("a guarded side holds no conditioning")
        if kind in ("codes", "tiered") and self.conditioned and not conditioned:
            # Its first encode fits the conditioning; codes without one would be decoded with the next fit's.
            raise ValueError("holds codes but no key conditioning, which this side's config fits before encoding")
        expected = {"recent", *_OLD_TENSORS[kind]}
        if conditioned:
            expected |= {"offset", *(name for name in ("scale",) if name in tensors)}
        if not version_1:
            expected |= {name for name in ("queries",) if name in tensors}
            if "exact" in tensors or "exact_index" in tensors:
                expected |= {"exact", "exact_index"}
            if rope_scaling is not None:
                expected.add("rope_inv_freq")
        if set(tensors) != expected:
            raise ValueError(f"has tensors {sorted(tensors)} but needs {sorted(expected)}")
        for name, tensor in tensors.items():  # nothing non-finite, nothing narrower than the window's float16
            if tensor.is_floating_point() and (tensor.dtype not in _STATE_DTYPES or not torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{name} must be finite {' or '.join(map(str, _STATE_DTYPES))}, not {_describe(tensor)}"
                )
        recent = tensors["recent"]
        if recent.dim() != 4 or not recent.is_floating_point():
            raise ValueError(f"recent must be a floating [batch, heads, tokens, dim] tensor, not {_describe(recent)}")
        batch, heads, _, dim = recent.shape
        old = None
        if kind in ("codes", "tiered"):
            if (state.get("method"), state.get("seed")) != (self.config.method, self.config.seed):
                raise ValueError(
                    f"codes were written with method {state.get('method')!r} and seed {state.get('seed')!r} "
                    f"but the config says {self.config.method!r} and {self.config.seed}"
                )
            dtype = _DTYPES.get(state.get("dtype")) if isinstance(state.get("dtype"), str) else None
            if dtype is None:
                raise ValueError(f"codes decode to dtype {state.get('dtype')!r}, none of {list(_DTYPES)}")
            bits = 2 if kind == "tiered" else self.bits  # a Tiered's codes are its first stages
            scales, octave = tensors["scales"], state.get("octave", 0)
            log = self.config.scale_bits == 8  # uint8 log codes below 2 ** octave, else bfloat16
            if scales.dtype != (torch.uint8 if log else SCALE_DTYPE) or ("octave" in state) != log:
                raise ValueError(
                    f"scales are {_describe(scales)} with octave {state.get('octave')!r} but scale_bits "
                    f"{self.config.scale_bits} holds {'uint8 with an octave' if log else 'bfloat16 without one'}"
                )
            old = Encoded(tensors["codes"], scales, bits, self.config.method, self.config.seed, dtype, octave)
            if old.scales.dim() != 3 or old.shape[:2] != (batch, heads) or old.dim != dim:
                raise ValueError(f"codes decode to {list(old.shape)}, which does not fit recent {list(recent.shape)}")
            if kind == "tiered":
                old = Tiered.checked(old, tensors["full"], tensors["second"])
            else:
                old.check_values()
        elif kind == "states":
            old = tensors["old"]
            if state["bits"] != 16 or old.dim() != 4 or old.shape[:2] != (batch, heads) or old.shape[-1] != dim:
                raise ValueError(
                    f"old states {_describe(old)} do not fit recent {list(recent.shape)} at {state['bits']} bits"
                )
        rope = _restore_rope(tensors.get("rope_inv_freq"), rope_scaling, dim)
        if rope is not None and self.rope is not None and not rope.same_as(self.rope):
            raise ValueError("holds RoPE frequencies or scaling other than the model's")
        conditioning = None
        if conditioned:
            conditioning = KeyConditioning(
                _checked_float(tensors, "offset", (batch, heads, 1, dim), bound=_STATE_BOUND),
                _checked_float(tensors, "scale", (batch, heads, 1, dim), bound=_SCALE_BOUND, positive=True),
                rope,
            )
        exact, exact_index = tensors.get("exact"), tensors.get("exact_index")
        if exact is not None:
            slots = self.exact_tokens
            if exact.dim() != 4 or tuple(exact.shape) != (batch, heads, slots, dim) or not exact.is_floating_point():
                raise ValueError(f"exact {_describe(exact)} is not floating [{batch}, {heads}, {slots}, {dim}]")
            if exact_index.dtype != torch.long or tuple(exact_index.shape) != (batch, heads, slots):
                raise ValueError(
                    f"exact_index must be int64 [{batch}, {heads}, {slots}] but is {_describe(exact_index)}"
                )
            if ((exact_index < -1) | (exact_index >= length(old))).any():
                raise ValueError(f"exact_index must be -1 or an index below {length(old)} (the old tokens)")
        queries = tensors.get("queries")
        if queries is not None and (queries.abs() > _STATE_BOUND).any():
            raise ValueError(f"queries must lie within +-{_STATE_BOUND:g}")
        if queries is not None and (
            queries.dim() != 4 or queries.shape[0] != batch or queries.shape[1] % heads or queries.shape[-1] != dim
        ):
            raise ValueError(f"queries {_describe(queries)} are not [{batch}, a multiple of {heads}, Q, {dim}]")
        error = state.get("logit_error")
        if error is not None and (not isinstance(error, list) or not all(isinstance(e, float) for e in error)):
            raise ValueError(f"logit_error must be a list of numbers, not {error!r}")
        if guarded:
            self.bits, self.exact_tokens = 16, 0
        self.pages, self.recent, self.conditioning, self.queries = Pages.of(old), recent, conditioning, queries
        self.exact, self.exact_index, self._sinks_held = exact, exact_index, None
        self.guarded, self.logit_error = guarded, error
        if rope is not None or not version_1 and self.conditioned:
            self.rope = rope  # the file's, as the saved cache had it


def _checked_float(tensors: dict, name: str, shape: tuple, bound: float, positive: bool = False) -> Tensor | None:
    tensor = tensors.get(name)
    if tensor is None:
        return None
    if tuple(tensor.shape) != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite floating {list(shape)} but is {_describe(tensor)}")
    if (tensor.abs() > bound).any() or positive and not (tensor >= 1 / bound).all():
        raise ValueError(f"{name} must lie within {'[1 / %g, %g]' % (bound, bound) if positive else '+-%g' % bound}")
    return tensor.float()


def _restore_rope(inv_freq: Tensor | None, scaling, dim: int) -> Rope | None:
    if scaling is None:
        return None
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 1e-6 < scaling < 1e6:
        raise ValueError(f"rope_scaling must be a number in (1e-6, 1e6), not {scaling!r}")
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or not 0 < 2 * inv_freq.shape[0] <= dim:
        raise ValueError(f"rope_inv_freq must be float32 [1 .. {dim // 2}], not {_describe(inv_freq)}")
    if not torch.isfinite(inv_freq).all():
        raise ValueError("rope_inv_freq must be finite")
    return Rope(inv_freq, float(scaling))


def _is_codes(old: object) -> bool:
    return isinstance(old, (Encoded, Tiered))


def _arange_like(x: Encoded | Tiered | Tensor, start: int) -> Tensor:
    """Token indices start..T_old-1 for every batch row and head of ``x``, as [B, H, T_old - start]."""
    scales = x[..., 0] if isinstance(x, Tensor) else x.scales
    index = torch.arange(start, scales.shape[-1], device=scales.device)
    return index.expand(*scales.shape[:-1], -1)


def _keep(stats: Tensor | None, keep: Tensor, candidates: int) -> Tensor | None:
    """Per-token statistics [B, H, T] after eviction: the kept candidates, then the rest."""
    if stats is None:
        return None
    return torch.cat([stats.gather(-1, keep), stats[..., candidates:]], -1)


class _StoredPositions:
    """A layer's ``_stored_positions``, holding the layer weakly: a bound method would make a
    reference cycle, and a cache in a cycle (with its query capture) outlives its last use until
    the garbage collector runs. Copies and pickles follow the layer."""

    def __init__(self, layer: "NexusQuantLayer"):
        self.layer = weakref.ref(layer)

    def __call__(self, start: int = 0, stop: int | None = None) -> Tensor:
        return self.layer()._stored_positions(start, stop)

    def __deepcopy__(self, memo: dict) -> "_StoredPositions":
        return _StoredPositions(copy.deepcopy(self.layer(), memo))

    def __reduce__(self):
        return _StoredPositions, (self.layer(),)


def _bytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


# A stream's exported old part: kind -> its tensors (see KVStream.state_tensors).
_OLD_TENSORS = {
    None: (),
    "codes": ("codes", "scales"),
    "tiered": ("codes", "scales", "second", "full"),  # a Tiered: first stages, second stages, tier mask
    "states": ("old",),
}
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}
_STATE_DTYPES = SUPPORTED_DTYPES  # what a file may hold states in: float8 would lose precision silently
# Far beyond what a model's keys, queries or fitted channel scales reach (key offsets are tens to
# hundreds; scales are normalised to a geometric mean of 1), far below what would overflow.
_STATE_BOUND, _SCALE_BOUND = 1e8, 1e6


def _describe(tensor: Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


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


# The shift of a row that has shown nothing but padding so far: its tokens then sit at very
# negative positions (never sinks, never in the conditioning's statistics), until a real token
# fixes the row's shift; the padding's keys are masked anyway.
UNKNOWN_SHIFT = -(1 << 40)


def _shift(previous: Tensor | None, key_states: Tensor, seen: int, kwargs: dict) -> Tensor:
    """Position minus index [B, 1] of the tokens of a layer that records no positions: left
    padding starts each row's positions later. A row's shift is fixed by its first real token
    (one whose position is above the one before it, as padding's is not)."""
    batch, length = key_states.shape[0], key_states.shape[-2]
    position_ids = kwargs.get("kwargs", kwargs).get("position_ids")
    if position_ids is None:
        return torch.zeros(batch, 1, dtype=torch.long, device=key_states.device) if previous is None else previous
    position_ids = position_ids.to(key_states.device, torch.long).expand(batch, -1)
    last = position_ids[:, -1:] - (seen + length - 1)
    real = position_ids[:, -1:] > position_ids[:, -2:-1] if length > 1 else torch.ones_like(last, dtype=torch.bool)
    if previous is None:
        return torch.where(real, last, UNKNOWN_SHIFT)
    return torch.where((previous == UNKNOWN_SHIFT) & real, last, previous)


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

    def __init__(
        self,
        config: NexusQuantConfig,
        scorer: str | None = None,
        sliding_window: int | None = None,
        rope: Rope | None = None,
        index: int | None = None,
        byte_budget: "ByteBudget | None" = None,
    ):
        super().__init__()
        self.config = config
        self.byte_budget = byte_budget  # the cache's, with ``target_ratio`` (allocation.py)
        self.index = index  # the layer's place in the model, when known (for messages)
        self.rope = rope  # the model's rotary embedding for this layer, when known
        self.sees_queries = False  # set by the cache when the model hands queries to observe()
        # Set by the cache with the query capture: whether the model's attention runs through
        # ours right now (then decode steps attend in the rotated domain), and their buffers.
        self.route: Callable[[], bool] | None = None
        self.scratch: Scratch | None = None
        self._route_confirmed = False  # a step showed our function gets update's keys as they are
        self._checking: Tensor | None = None  # the keys of that step, until the function sees them
        self.scorer = scorer or config.scorer
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.evicts = config.evicts and not self.is_sliding
        self.demotes = config.demotes and not self.is_sliding
        self.ranks = self.evicts or self.demotes  # scores its tokens
        self.biases = self.evicts and config.merge_bias  # merged tokens carry a logit bias
        self.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a NexusQuantCache cannot be cropped: its quantized and evicted tokens cannot be restored "
            "(start a new cache, or load a saved one, to go back to an earlier prompt)"
        )

    def reset(self) -> None:
        if self.byte_budget is not None:
            self.byte_budget.forget()  # the cache starts again: a count planned for it is stale
        # Keys are conditioned unless the config turns it off; sliding layers have no sinks to keep.
        conditioned = self.config.center_keys is not False
        sinks = 0 if self.is_sliding else self.config.sink_tokens
        self.key_stream = KVStream(self.config.key_bits, self.config, conditioned, sinks, self.demotes)
        self.key_stream.rope, self.key_stream.positions = self.rope, _StoredPositions(self)
        if self.index is not None:
            self.key_stream.name = f"layer {self.index}"
        self.value_stream = KVStream(self.config.value_bits, self.config, tiered=self.demotes)
        self.positions: Tensor | None = None  # int32 [B, H, T_stored], only when evicting
        # float16 [B, H, T_stored], only when evicting or demoting by score (streaming ranks by position)
        self.scores: Tensor | None = None
        # float16 [B, H, T_stored], only when merging with a bias: log of the share of attention a
        # merged token stands for (0 for a token that absorbed nothing), added to its logits.
        self.logit_bias: Tensor | None = None
        self.shift: Tensor | None = None  # int64 [B, 1]: position minus index of the tokens, when not evicting
        self._shift_pending = False  # some row has shown only padding so far
        self.seen = 0
        self._unsettled = False
        self._handed = None  # the window keys update handed out for attend, until it runs
        self.is_initialized = False

    def _stored_positions(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Positions of the stored tokens ``start:stop``: [B, H, T] when evicting, else [B, 1, T]."""
        if self.positions is not None:
            return self.positions[..., start:stop]
        first = self.seen - self.key_stream.length
        stop = self.key_stream.length if stop is None else stop
        indices = torch.arange(first + start, first + stop, device=self.device)
        return (indices[None] if self.shift is None else self.shift + indices)[:, None]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        missed = PENDING_LAYER.get()
        if missed is not None:  # the attention that ran after that layer's update was not ours
            PENDING_LAYER.set(None)
            missed[0]._queries_stopped()
        self.settle()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.ranks:
            self._record(key_states, kwargs)
        # Without eviction, positions follow from a shift per row: needed by the sinks, RoPE-aware
        # conditioning and demotion's ranking (which keeps the sinks and sees the padding).
        needs_shift = self.demotes or self.key_stream._needs_positions()
        if not self.evicts and needs_shift and (self.shift is None or self._shift_pending):
            self.shift = _shift(self.shift, key_states, self.seen, kwargs)
            self._shift_pending = bool((self.shift == UNKNOWN_SHIFT).any())
        self.seen += key_states.shape[-2]
        # While our attention function runs (``route``), a short forward gets only the window's
        # states: the function hands the queries to ``attend``, which reads the old tokens as codes.
        # The first such step hands out every state and checks that our function receives them
        # as they are (a model that changes its keys after update, as JetMoe repeats them, does not).
        # Autograd-tracked forwards keep the reference path (what a product reads, autograd keeps).
        eligible = key_states.shape[-2] <= ROTATED_QUERIES and self.key_stream.old_length > 0
        eligible = eligible and not torch.is_grad_enabled() and self.route is not None and self.route()
        rotated = eligible and self._route_confirmed
        keys = self.key_stream.append(key_states, with_old=not rotated)
        values = self.value_stream.append(value_states, with_old=not rotated)
        self._unsettled = True
        self._handed = keys if rotated else None
        self._checking = keys if eligible and not rotated else None
        scoring = self.ranks and self.scorer in ATTENTION_SCORERS
        biased = self.logit_bias is not None and self.route is not None and self.key_stream.old_length > 0
        if eligible or scoring or biased or (self.sees_queries and self.key_stream.wants_queries):
            PENDING_LAYER.set((self, keys))  # the attention function takes it right away
        return keys, values

    def route_checked(self, keys: Tensor) -> None:
        """Our attention function received ``keys`` as ``update`` returned them."""
        if self._checking is keys:
            self._route_confirmed, self._checking = True, None

    def handed_window(self, keys: Tensor) -> bool:
        """Whether ``keys`` are the window alone that ``update`` handed out for :meth:`attend`."""
        return self._handed is keys

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None, scaling: float, **options
    ) -> Tensor:
        """Attention of ``query`` [B, Hq, q, d] over every stored token, the old ones read as
        codes in the rotated domain (attention.py), given the window's ``keys`` and ``values``
        that :meth:`update` returned; feeds the eviction scores as ``observe`` does. Returns
        [B, q, Hq, d]. ``options``: ``dropout``, ``causal`` (used when the mask is None)."""
        self._handed = None
        if self.scratch is None:
            self.scratch = Scratch()
        stored_keys = self.key_stream.stored_keys(self.scratch)
        old_values = self.value_stream.old_for_attention(self.scratch, "values")
        bias = None if self.logit_bias is None else self.logit_bias[..., : self.key_stream.old_length]
        out, weights = attend(
            query, stored_keys, old_values, keys, values, attention_mask, scaling, logit_bias=bias, **options
        )
        self.observe(query, None, attention_mask, scaling, weights)
        return out

    def biased_mask(self, attention_mask: Tensor | None, query: Tensor, causal: bool) -> Tensor | None:
        """The mask for attention over every stored token (``update``'s states): ``attention_mask``
        with the merged tokens' logit bias added (attention.biased_mask), or as it is without one."""
        if self.logit_bias is None or not self.key_stream.old_length:
            return attention_mask
        return biased_mask(attention_mask, self.logit_bias, query, causal)

    def _record(self, key_states: Tensor, kwargs: dict) -> None:
        """Record the new tokens' positions (when evicting: stored tokens then differ per head) and scores."""
        batch, heads, length, _ = key_states.shape
        if self.evicts:
            if self.seen + length >= 2**31:
                raise ValueError("an evicting NexusQuantCache holds positions as int32: at most 2^31 - 1 tokens")
            positions = _positions(length, self.seen, kwargs, key_states.device).to(torch.int32)
            positions = positions[:, None].expand(batch, heads, length).contiguous()  # per head once evicting
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        if self.biases:
            zeros = torch.zeros(batch, heads, length, dtype=torch.float16, device=key_states.device)
            self.logit_bias = zeros if self.logit_bias is None else torch.cat([self.logit_bias, zeros], -1)
        if self.scorer == "streaming":
            return
        if self.scorer == "keynorm":
            scores = key_norm_scores(key_states).half()
        else:
            scores = torch.zeros(batch, heads, length, dtype=torch.float16, device=key_states.device)  # see observe()
        self.scores = scores if self.scores is None else torch.cat([self.scores, scores], -1)

    def _queries_stopped(self) -> None:
        """The model's attention no longer hands this layer its queries (its implementation was
        changed while the cache lives): say so and rank by key norm rather than on stale scores."""
        if self.ranks and self.scorer in ATTENTION_SCORERS:
            warnings.warn(
                "NexusQuantCache: the model's attention stopped handing its queries to the cache (was its "
                f"attention implementation changed?); {self.scorer!r} falls back to 'keynorm'",
                stacklevel=3,
            )
            self.score_by_key_norm()
        if self.logit_bias is not None:
            warnings.warn(MERGE_BIAS_LOST, stacklevel=3)
        self.sees_queries, self.route = False, None  # and decode steps hand attention every state again

    def score_by_key_norm(self) -> None:
        """Rank tokens by key norm from now on (the model's queries no longer come); the stored
        tokens are scored again, so that old and new scores compare."""
        self.scorer, self.sees_queries = "keynorm", False
        if self.scores is not None and self.scores.shape[-1]:
            stream = self.key_stream
            parts = [stream.old_states().float()] if stream.old_length else []
            parts += [stream.recent.float()] if stream.recent is not None else []
            self.scores = key_norm_scores(torch.cat(parts, -2)).half()

    def observe(
        self, query: Tensor, keys: Tensor | None, attention_mask: Tensor | None, scaling: float, weights=None
    ) -> None:
        """Add the attention this forward's queries [B, Hq, q, d] paid to ``keys`` [B, Hkv, S, d],
        the states ``update`` returned, or the attention ``weights`` [B, Hkv, g, q, S] already computed."""
        stream = self.key_stream
        if stream.wants_queries:  # the latest queries, for the first encode's conditioning and guard
            latest = query if stream.queries is None else torch.cat([stream.queries, query], -2)
            stream.queries = latest[..., -self.config.observation_window :, :].clone()
        if not self.ranks or self.scorer not in ATTENTION_SCORERS:
            return
        length = query.shape[-2]
        if self.scorer == "snapkv":
            # An exponential window of about `observation_window` queries: stale votes fade, so
            # tokens that arrived late are not outvoted by the sheer age of older ones.
            window = self.config.observation_window
            self.scores.mul_((1 - 1 / window) ** length)
        else:
            window = length
        pool = SNAPKV_POOL if self.scorer == "snapkv" else 1
        if weights is not None:
            self.scores += weight_scores(weights, window, pool)
        else:
            self.scores += attention_scores(query, keys, attention_mask, scaling, window, pool)

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
            budget = config.budget(self.seen)
            if self.byte_budget is not None and leaving and not self.is_sliding:
                budget = min(budget, self.byte_budget.tokens(self.seen))  # planned where tokens are encoded
            excess = self.key_stream.length - budget
            if excess >= config.block_size or (excess > 0 and leaving):
                ranking = self.positions if self.scores is None else self.scores
                keep = select_kept(
                    ranking[..., :candidates],
                    self.positions[..., :candidates],
                    max(candidates - excess, 0),
                    config.sink_tokens,
                )
                if config.merge != "off" and leaving:
                    self._merge(keep, candidates, leaving)
        if leaving or keep is not None:
            self.key_stream.retire(leaving, keep)  # reads the candidates' positions
            self.value_stream.retire(leaving, keep)
        if keep is not None:
            self.positions = _keep(self.positions, keep, candidates)
            self.scores = _keep(self.scores, keep, candidates)
            self.logit_bias = _keep(self.logit_bias, keep, candidates)
        if self.demotes and leaving:
            self._demote()

    def _demote(self) -> None:
        """Demote the lowest-ranked tokens still above 2 bits until at most ``full_bits_budget``
        tokens (the window included, never fewer than the sinks, which are never demoted) stay
        above; the same tokens in every side that can drop a stage. Tokens already demoted rank
        last: they cannot come back, so they take no place among those kept."""
        tiered = [stream for stream in (self.key_stream, self.value_stream) if stream.tiered and stream._holds_codes()]
        if not tiered:
            return
        above = tiered[0].above_2_bits()
        allowed = max(self.config.full_bits_budget(self.seen) - tiered[0].recent.shape[-2], self.config.sink_tokens)
        batch, heads, old_length = above.shape
        pooled = self.config.full_bits_split == "layer"  # the heads of a batch row share heads * allowed
        if (above.flatten(1).sum(-1) <= allowed * heads).all() if pooled else (above.sum(-1) <= allowed).all():
            return
        positions = self._stored_positions(0, old_length).expand_as(above)
        positions = positions.masked_fill(positions < 0, PAD)  # left padding (shifted below 0) ranks last
        ranking = (positions if self.scores is None else self.scores[..., :old_length]).float()
        ranking = ranking.masked_fill(~above, float("-inf"))
        if pooled:  # attention masses are comparable across heads; positions too
            kept = select_kept(
                ranking.reshape(batch, 1, -1), positions.reshape(batch, 1, -1), allowed * heads, self.config.sink_tokens
            ).view(batch, -1)
            demoted = torch.ones_like(above).view(batch, -1).scatter_(-1, kept, False).view_as(above)
        else:
            kept = select_kept(ranking, positions, allowed, self.config.sink_tokens)
            demoted = torch.ones_like(above).scatter_(-1, kept, False)
        for stream in tiered:
            stream.demote(demoted)

    def _merge(self, keep: Tensor, candidates: int, leaving: int) -> None:
        """Fold each evicted token into the most similar kept token that leaves the window now
        (not yet encoded, so no token is encoded twice), weighted by score; pads are dropped."""
        old_length = candidates - leaving
        dropped = evicted(keep, candidates)
        kept = torch.zeros_like(self.positions[..., :candidates], dtype=torch.bool).scatter_(-1, keep, True)
        weights = torch.ones_like(self.positions[..., :candidates], dtype=torch.float32)
        if self.scorer in ATTENTION_SCORERS:  # attention mass; other scorers' values are not masses
            weights = self.scores[..., :candidates].float().clamp_min(0)
        weights = weights.masked_fill(self.positions[..., :candidates] == PAD, 0)
        keys = self.key_stream.gather(dropped, leaving)
        target, found = merge_targets(keys, self.key_stream.recent[..., :leaving, :], kept[..., old_length:])
        dropped_weights = weights.gather(-1, dropped) * found
        target_weights = weights[..., old_length:]
        if self.logit_bias is not None:
            self._bias_targets(target, found, dropped, old_length, candidates)
        if self.config.merge == "keys_values":
            self.key_stream.merge_into_window(target, keys, dropped_weights, target_weights)
        values = self.value_stream.gather(dropped, leaving)
        self.value_stream.merge_into_window(target, values, dropped_weights, target_weights)
        if self.scores is not None and self.scorer in ATTENTION_SCORERS:
            merged = torch.scatter_add(target_weights, -1, target, dropped_weights).to(self.scores.dtype)
            self.scores = torch.cat([self.scores[..., :old_length], merged, self.scores[..., candidates:]], -1)

    def _bias_targets(self, target: Tensor, found: Tensor, dropped: Tensor, old_length: int, candidates: int) -> None:
        """Give each merge target the logit bias log(n), n the tokens it now stands for (itself,
        and those folded in, counting what they had absorbed): n near-equal keys draw n times one
        key's attention (as ToMe's proportional attention). Targets leave the window now, so
        they have absorbed nothing before."""
        stands_for = self.logit_bias[..., :candidates].float().exp()
        absorbed = torch.zeros_like(stands_for[..., old_length:])
        real = found & (self.positions.gather(-1, dropped) != PAD)  # padding stands for nothing
        absorbed.scatter_add_(-1, target, stands_for.gather(-1, dropped) * real)
        bias = self.logit_bias.clone()
        bias[..., old_length:candidates] = absorbed.log1p().half()
        self.logit_bias = bias

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        self.settle()
        stored = self.key_stream.length
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def baseline_numel(self, seen: int | None = None) -> int:
        """Numbers a 16-bit DynamicCache layer of the same kind holds for the tokens seen (or ``seen``)."""
        seen = self.seen if seen is None else seen
        tokens = seen if not self.is_sliding else min(seen, self.sliding_window - 1)
        return self.key_stream.numel(tokens) + self.value_stream.numel(tokens)

    def planned_nbytes(self, seen: int, stored: int) -> int:
        """Bytes this layer will hold once settled after ``seen`` tokens, keeping ``stored`` of
        them (a sliding layer keeps its window whatever ``stored``), right after a block leaves the
        full-precision window: what :meth:`nbytes` will count then (allocation.py plans with it)."""
        config = self.config
        stored = min(seen, self.sliding_window - 1) if self.is_sliding else stored
        # Fewer tokens than a window and a block never leave the window (a short sliding one).
        window = stored if stored < config.recent_window + config.block_size else config.recent_window
        old = stored - window
        full = old
        if self.demotes:
            full = min(old, max(config.full_bits_budget(seen) - window, config.sink_tokens))
        keys, values = self.key_stream, self.value_stream
        total = keys.planned_nbytes(old, window, full) + values.planned_nbytes(old, window, full)
        batch, heads = keys.recent.shape[:2]
        if self.evicts:
            total += batch * heads * stored * 4  # int32 positions
        if self.ranks and self.scorer != "streaming":
            total += batch * heads * stored * 2  # float16 scores
        if self.biases:
            total += batch * heads * stored * 2  # float16 logit bias
        return total + _bytes(self.shift)

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
        if self.logit_bias is not None:
            self.logit_bias = fn(self.logit_bias)
        if self.shift is not None:
            self.shift = fn(self.shift)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def check_representable(self, dtype: torch.dtype) -> None:
        """Raise ValueError unless every state this layer would hand a model of ``dtype`` is finite in it."""
        for name, stream in (("keys", self.key_stream), ("values", self.value_stream)):
            try:
                stream.check_representable(dtype)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None

    def nbytes(self) -> dict[str, int]:
        """Bytes held by part: codes, scales, full-precision window, positions and statistics."""
        self.settle()
        keys, values = self.key_stream.nbytes(), self.value_stream.nbytes()
        parts = {part: keys[part] + values[part] for part in keys}
        parts["metadata"] += _bytes(self.positions) + _bytes(self.scores) + _bytes(self.logit_bias) + _bytes(self.shift)
        return parts

    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Every tensor held, by name (``keys.*``, ``values.*``, ``positions``, ``scores``,
        ``shift``), and what :meth:`restore` needs besides them. Settles first."""
        self.settle()
        if not self.is_initialized:
            return {}, {"seen": 0}
        tensors = {
            "positions": self.positions,
            "scores": self.scores,
            "logit_bias": self.logit_bias,
            "shift": self.shift,
        }
        state = {"seen": self.seen}
        for name, stream in (("keys", self.key_stream), ("values", self.value_stream)):
            held, state[name] = stream.state_tensors()
            tensors |= {f"{name}.{part}": tensor for part, tensor in held.items()}
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}, state

    def restore(self, tensors: dict[str, Tensor], state: dict) -> None:
        """Take back what :meth:`state_tensors` gave (read from a file, perhaps onto another
        device), once it is checked to fit this layer; a ValueError says what does not."""
        self.reset()
        seen = state.get("seen") if isinstance(state, dict) else None
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise ValueError(f"tokens seen must be an integer >= 0, not {seen!r}")
        if seen == 0:
            if tensors:
                raise ValueError(f"has seen no tokens but holds {sorted(tensors)}")
            return
        for name, stream in (("keys", self.key_stream), ("values", self.value_stream)):
            held = {part.removeprefix(f"{name}."): t for part, t in tensors.items() if part.startswith(f"{name}.")}
            try:
                stream.restore(held, state.get(name))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        keys, values = self.key_stream, self.value_stream
        batch, heads = keys.recent.shape[:2]
        shapes = [
            (*stream.recent.shape[:2], stream.old_length, stream.length, stream.recent.shape[-1])
            for stream in (keys, values)
        ]
        if shapes[0] != shapes[1]:  # every model the cache serves has values as wide as keys
            raise ValueError("keys and values hold different batch sizes, heads, token counts or head_dim")
        stored = keys.length
        expected = min(seen, self.sliding_window - 1) if self.is_sliding else seen
        if stored > expected or (stored < expected and not self.evicts):
            bound = "at most " if self.evicts else ""
            raise ValueError(f"holds {stored} tokens after {seen} seen; this layer holds {bound}{expected}")
        # Eviction ranks by positions and, unless streaming, scores: one per stored token.
        wanted = {
            "positions": self.evicts,
            "scores": self.ranks and self.scorer != "streaming",
            "logit_bias": self.biases,
        }
        allowed = {*(name for name, needed in wanted.items() if needed), *(() if self.evicts else ("shift",))}
        unexpected = {name for name in tensors if not name.startswith(("keys.", "values.")) and name not in allowed}
        if unexpected:
            raise ValueError(f"holds tensors {sorted(unexpected)} that this layer does not use")
        shift = tensors.get("shift")  # none: the keys need no positions (always so in format version 1)
        if shift is not None and (shift.dtype != torch.long or tuple(shift.shape) != (batch, 1)):
            raise ValueError(f"shift must be int64 [{batch}, 1] but is {_describe(shift)}")
        for name in (name for name, needed in wanted.items() if needed):
            tensor = tensors.get(name)
            dtype_ok = tensor is not None and tensor.dtype == (torch.int32 if name == "positions" else torch.float16)
            if not dtype_ok or tuple(tensor.shape) != (batch, heads, stored):
                kind = "int32" if name == "positions" else "float16"
                found = "nothing" if tensor is None else _describe(tensor)
                raise ValueError(f"{name} must be {kind} [{batch}, {heads}, {stored}] but is {found}")
        positions, scores, bias = tensors.get("positions"), tensors.get("scores"), tensors.get("logit_bias")
        if positions is not None and stored:
            real = positions != PAD
            if ((positions < 0) & real).any() or (positions >= seen).any():
                raise ValueError(f"positions must be {PAD} (padding) or in [0, {seen}) (the tokens seen)")
            if not real.any(-1).all():
                raise ValueError("positions hold a batch row and head of nothing but padding")
        if scores is not None and not torch.isfinite(scores).all():
            raise ValueError("scores must be finite")
        if bias is not None and not ((bias >= 0) & (bias <= _MAX_LOGIT_BIAS)).all():
            raise ValueError(f"logit_bias must lie in [0, {_MAX_LOGIT_BIAS:.1f}] (the log of a token count)")
        if bias is not None and (bias[..., keys.old_length :] != 0).any():
            raise ValueError("logit_bias must be 0 in the full-precision window (only encoded tokens absorb others)")
        self.positions, self.shift, self.seen = positions, shift, seen  # what _stored_positions reads
        self.device = keys.recent.device
        if keys.exact_index is not None:
            held = keys.exact_index >= 0
            stored_positions = self._stored_positions()[..., : keys.old_length].expand(batch, heads, -1)
            at = torch.gather(stored_positions, -1, keys.exact_index.clamp(min=0)) if keys.old_length else None
            slots = torch.arange(keys.exact_index.shape[-1], device=held.device)
            if held.any() and ((at != slots) & held).any():
                raise ValueError("keys: exact_index must point at the old tokens whose positions are the sinks' slots")
        self.scores, self.logit_bias = scores, bias
        self._shift_pending = shift is not None and bool((shift == UNKNOWN_SHIFT).any())
        self.is_initialized = True
