"""One full-attention layer of a NexusQuantCache: packed codes for old tokens, full precision
for the newest, following transformers' cache-layer contract.

Each side (keys, values) is a :class:`KVStream`. ``update`` returns the decoded old tokens, the
full-precision window and the new tokens, exactly what this forward's attention needs, and only
then encodes what has fallen out of the window: the current forward never sees its own tokens
quantized, and every token is encoded exactly once.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .codec import Encoded, decode, encode
from .config import NexusQuantConfig

__all__ = ["KVStream", "NexusQuantLayer"]


class KVStream:
    """Keys or values of one layer, [batch, heads, tokens, head_dim]: the oldest tokens as codes
    (``encoded``, codes [B, H, T_old, d * bits / 8] and scales [B, H, T_old]), the newest
    (``recent`` [B, H, T_new, d]) as given."""

    def __init__(self, bits: int, config: NexusQuantConfig):
        self.bits = bits
        self.config = config
        self.encoded: Encoded | None = None
        self.recent: Tensor | None = None

    @property
    def length(self) -> int:
        encoded = 0 if self.encoded is None else self.encoded.scales.shape[-1]
        return encoded + (0 if self.recent is None else self.recent.shape[-2])

    def append(self, states: Tensor) -> Tensor:
        """Add ``states`` [B, H, q, d]; return every state of the stream, new ones included."""
        self.recent = states if self.recent is None else torch.cat([self.recent, states], dim=-2)
        everything = self.recent if self.encoded is None else torch.cat([decode(self.encoded), self.recent], dim=-2)
        self._encode_overflow()
        return everything

    def _encode_overflow(self) -> None:
        window = self.config.recent_window
        if self.bits == 16 or self.recent.shape[-2] < window + self.config.block_size:
            return
        leaving = self.recent.shape[-2] - window
        fresh = encode(self.recent[..., :leaving, :], self.bits, self.config.method, self.config.seed)
        self.recent = self.recent[..., leaving:, :]
        self.encoded = fresh if self.encoded is None else _concat(self.encoded, fresh)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (an indexing of dim 0) to every tensor held."""
        if self.recent is not None:
            self.recent = fn(self.recent)
        if self.encoded is not None:
            self.encoded = dataclasses.replace(self.encoded, codes=fn(self.encoded.codes), scales=fn(self.encoded.scales))

    def numel_seen(self) -> int:
        """Numbers a full-precision cache would hold for the same tokens."""
        if self.recent is None:
            return 0
        batch, heads, _, dim = self.recent.shape
        return batch * heads * self.length * dim

    def nbytes(self) -> dict[str, int]:
        parts = {"codes": 0, "scales": 0, "window": 0}
        if self.encoded is not None:
            parts["codes"] = _bytes(self.encoded.codes)
            parts["scales"] = _bytes(self.encoded.scales)
        if self.recent is not None:
            parts["window"] = _bytes(self.recent)
        return parts


def _concat(first: Encoded, second: Encoded) -> Encoded:
    return dataclasses.replace(
        first,
        codes=torch.cat([first.codes, second.codes], dim=-2),
        scales=torch.cat([first.scales, second.scales], dim=-1),
    )


def _bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class NexusQuantLayer(CacheLayerMixin):
    """A full-attention layer whose old tokens are held as E8 (or scalar) codes."""

    is_sliding = False
    is_compileable = False
    # Quantization cannot be undone, so assisted decoding's rollback is refused (transformers
    # then explains that this cache cannot be cropped).
    is_croppable = False

    def __init__(self, config: NexusQuantConfig):
        super().__init__()
        self.config = config
        self.key_stream = KVStream(config.key_bits, config)
        self.value_stream = KVStream(config.value_bits, config)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.key_stream.append(key_states), self.value_stream.append(value_states)

    def get_seq_length(self) -> int:
        return self.key_stream.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_stream = KVStream(self.config.key_bits, self.config)
        self.value_stream = KVStream(self.config.value_bits, self.config)
        self.is_initialized = False

    def offload(self):
        pass  # the compressed layer is small; it stays where it is

    def prefetch(self):
        pass

    def _map_batch(self, fn) -> None:
        self.key_stream.map_batch(fn)
        self.value_stream.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> dict[str, int]:
        keys, values = self.key_stream.nbytes(), self.value_stream.nbytes()
        return {part: keys[part] + values[part] for part in keys}
