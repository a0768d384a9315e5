"""Key conditioning: what keys go through before the codec, fitted per layer and KV head.

Keys of models with biased key projections (Qwen2/2.5) or normalised keys (Gemma 3) carry large
per-channel offsets. The codec's one scale per vector then spends its range on the offset and
the token-specific part drowns: 4-bit keys broke Qwen2.5 (+143% perplexity). A plain mean does
not remove such an offset, because RoPE rotates it with the token's position. So, per head:

- ``offset``: the mean of the keys with RoPE undone (the model's own frequencies, read once by
  the integration module). A key at position p is stored as ``k - R(p) offset`` and decoded by
  adding ``R(p) offset`` back: exact whatever the frequencies, and the residual is small when
  they are the model's. Without RoPE settings the offset is the plain mean.
- ``scale``: where the model's queries were seen, a per-channel multiplier (equal on the two
  channels RoPE rotates together, so it commutes with RoPE) that spends the codec's error where
  the queries look least: ``(E q^2 / E r^2) ** (1/4)``, which minimises the expected error of
  ``q . k`` for a codec whose error is proportional to the vector it encodes. It is kept only
  for the heads where it lowers the measured error of the attention logits.

Everything here is plain torch; transformers is never touched.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from .codec import decode, encode

__all__ = ["GUARD_FACTOR", "KeyConditioning", "Rope", "fit_key_conditioning", "guard_limit", "logit_error"]

_TINY = 1e-12
# The guard falls back to exact keys where the logit error is this many times the codec's own
# error on Gaussian data (what well-conditioned keys give; see guard_limit).
GUARD_FACTOR = 10.0


@functools.cache
def guard_limit(bits: int, method: str = "e8") -> float:
    """The largest :func:`logit_error` a layer's keys may show at ``bits`` before the guard
    keeps them exact: GUARD_FACTOR times the relative squared error of the codec on Gaussian vectors."""
    sample = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    error = (decode(encode(sample, bits, method)) - sample).pow(2).sum() / sample.pow(2).sum()
    return GUARD_FACTOR * error.item()


# Rope.trig's tables by (frequencies, scaling, device); a handful at most (one per RoPE kind in use).
_TRIG_TABLES: dict[tuple, Tensor] = {}
_TRIG_KEPT = 8
_TRIG_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class Rope:
    """A layer's rotary embedding, transformers' convention: the first ``2 * len(inv_freq)``
    channels rotate in pairs (i, i + half), by ``position * inv_freq[i]``, and cos and sin are
    multiplied by ``scaling``; the rest pass through."""

    inv_freq: Tensor  # float32 [rotated / 2]
    scaling: float = 1.0

    def same_as(self, other: "Rope") -> bool:
        """Whether ``other`` rotates as this one does (up to float rounding: another release may
        compute the model's frequencies in another order)."""
        mine, theirs = self.inv_freq.cpu(), other.inv_freq.cpu()
        return (
            mine.shape == theirs.shape
            and torch.allclose(mine, theirs, rtol=1e-4, atol=0)
            and abs(self.scaling - other.scaling) <= 1e-4 * abs(other.scaling)
        )

    def apply(self, x: Tensor, positions: Tensor, inverse: bool = False) -> Tensor:
        """R(p) x (or its inverse) for ``x`` [..., T, d] float32 at ``positions`` broadcastable to [..., T]."""
        half = self.inv_freq.shape[0]
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(x.device)
        cos, sin = angles.cos() * self.scaling, angles.sin() * self.scaling
        if inverse:  # the inverse of a scaled rotation: rotate back, divide by the scale squared
            cos, sin = cos / self.scaling**2, -sin / self.scaling**2
        x = x.expand(*torch.broadcast_shapes(x.shape[:-1], angles.shape[:-1]), x.shape[-1])
        first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], -1)

    def trig(self, count: int, device: torch.device, most: int) -> Tensor:
        """[>= count, 2 * half] float32: ``scaling * cos(p inv_freq), scaling * sin(p inv_freq)`` at
        positions p = 0, 1, ...: one table per frequencies and device, shared by every layer and
        cache that turns by them, grown by doubling up to ``most`` rows (``count`` <= ``most``),
        so a step computes no cos or sin."""
        key = (self._key, torch.device(device))
        table = _TRIG_TABLES.get(key)
        if table is None or table.shape[0] < count:
            size = max(count, min(2 * (0 if table is None else table.shape[0]), most), min(1024, most))
            with torch.inference_mode(False):  # shared: usable inside and outside inference mode
                angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
                table = torch.cat([angles.cos() * self.scaling, angles.sin() * self.scaling], -1)
            with _TRIG_LOCK:  # caches decode on several threads
                if len(_TRIG_TABLES) >= _TRIG_KEPT and key not in _TRIG_TABLES:
                    del _TRIG_TABLES[next(iter(_TRIG_TABLES))]
                _TRIG_TABLES[key] = table
        return table

    def trig_at(self, positions: Tensor) -> Tensor:
        """The rows of :meth:`trig` for ``positions`` [...]: [..., 2 * half] float32, computed."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return torch.cat([angles.cos() * self.scaling, angles.sin() * self.scaling], -1)

    @functools.cached_property
    def _key(self) -> tuple:
        return self.inv_freq.cpu().numpy().tobytes(), self.scaling

    def add_rotated(self, out: Tensor, x: Tensor, positions: Tensor) -> Tensor:
        """``out += R(p) x`` in place, for ``out`` [B, H, T, d] float32, ``x`` [B, H, 1, d] and
        ``positions`` broadcastable to [B, H, T]: the decode path, with no [B, H, T, d] temporaries."""
        half = self.inv_freq.shape[0]
        angles = positions.to(out.device, torch.float32)[..., None] * self.inv_freq.to(out.device)
        cos, sin = angles.cos().mul_(self.scaling), angles.sin().mul_(self.scaling)
        first, second = x[..., :half], x[..., half : 2 * half]
        out[..., :half].addcmul_(cos, first).addcmul_(sin, second, value=-1)
        out[..., half : 2 * half].addcmul_(cos, second).addcmul_(sin, first)
        out[..., 2 * half :] += x[..., 2 * half :]
        return out


@dataclass
class KeyConditioning:
    """The fitted transform of one layer's keys: ``offset`` [B, H, 1, d] float32 (pre-RoPE when
    ``rope`` is set), ``scale`` [B, H, 1, d] float32 or None."""

    offset: Tensor
    scale: Tensor | None = None
    rope: Rope | None = None

    def shift(self, positions: Tensor) -> Tensor:
        """The offset at each position: [B, H, T, d] float32 (positions broadcast to [B, H, T])."""
        if self.rope is None:
            return self.offset
        return self.rope.apply(self.offset, positions)

    def forward(self, keys: Tensor, positions: Tensor) -> Tensor:
        """What the codec encodes for ``keys`` [B, H, T, d]: float32."""
        residual = keys.float() - self.shift(positions)
        return residual if self.scale is None else residual * self.scale

    def inverse(self, encoded: Tensor, positions: Tensor, reuse: bool = False) -> Tensor:
        """Keys back from what :meth:`forward` gave (float32); ``reuse``: ``encoded`` (float32)
        may be overwritten, as decode's fresh output may."""
        if self.scale is not None:
            out = encoded.float().div_(self.scale) if reuse else encoded.float() / self.scale
        else:
            out = encoded.float() if reuse else encoded.float().clone()
        if self.rope is None:
            return out.add_(self.offset)
        return self.rope.add_rotated(out, self.offset, positions)

    def map_batch(self, fn) -> None:
        self.offset = fn(self.offset)
        if self.scale is not None:
            self.scale = fn(self.scale)


def fit_key_conditioning(
    keys: Tensor,
    positions: Tensor | None,
    rope: Rope | None,
    queries: Tensor | None,
    bits: int,
    method: str,
    seed: int,
    sinks: int = 0,
) -> tuple[KeyConditioning, Tensor | None]:
    """The conditioning of a layer fitted on its first keys [B, H, T, d] at ``positions``
    (broadcastable to [B, H, T]; tokens at positions below ``sinks``, stored exactly, and
    padding, at negative positions, are left out of the statistics), and, given the model's
    queries [B, Hq, Q, d], the relative error of the attention logits [B, H] with the chosen
    conditioning (see :func:`logit_error`)."""
    batch, heads, tokens, _ = keys.shape
    if positions is None:  # no positions: the first tokens are the sinks
        positions = torch.arange(tokens, device=keys.device)
    positions = positions.expand(batch, heads, tokens)
    aligned = keys.float() if rope is None else rope.apply(keys.float(), positions, inverse=True)
    # Statistics over the real tokens past the sinks, pooled over the batch: the offset is the
    # model's (its key bias), and a row of nothing but padding so far gets it too.
    counted = positions >= sinks
    if not counted.any():
        counted = positions >= 0 if (positions >= 0).any() else torch.ones_like(counted)
    weights = counted.float()[..., None]
    total = weights.sum((0, 2), keepdim=True).clamp_min(1)
    offset = ((aligned * weights).sum((0, 2), keepdim=True) / total).expand(batch, -1, -1, -1).contiguous()
    conditioning = KeyConditioning(offset, None, rope)
    if queries is None:
        return conditioning, None
    # Judge on at most 256 tokens: the choice must not cost a second encoding of a long prompt.
    stride = max(1, tokens // 256)
    probe, probe_positions, probe_counted = keys[..., ::stride, :], positions[..., ::stride], counted[..., ::stride]
    residual = conditioning.forward(keys, positions)
    half = keys.shape[-1] // 2 if rope is None else rope.inv_freq.shape[0]
    scale = _query_scale(queries, residual, weights / total, half).expand(batch, -1, -1, -1).contiguous()
    scaled = KeyConditioning(offset, scale, rope)
    plain_error, scaled_error = logit_errors(
        queries, probe, [conditioning, scaled], probe_positions, bits, method, seed, probe_counted
    )
    better = (scaled_error.amax(0) < plain_error.amax(0))[None, :, None, None]  # one choice per head
    conditioning.scale = torch.where(better, scale, torch.ones_like(scale))
    return conditioning, torch.where(better[..., 0, 0], scaled_error, plain_error)


def _query_scale(queries: Tensor, residual: Tensor, weights: Tensor, half: int) -> Tensor:
    """Per-channel scale [1, H, 1, d] from the queries' and residual keys' (token ``weights``
    [B, H, T, 1], summing to 1 per head) second moments, pooled over the batch, the two channels
    of a RoPE pair (i, i + ``half``) sharing one, normalised to a geometric mean of 1."""
    batch, heads, _, dim = residual.shape
    group = queries.shape[1] // heads
    query_power = queries.float().pow(2).reshape(batch, heads, group, -1, dim).mean((0, 2, 3))[None, :, None]
    key_power = (residual.pow(2) * weights).sum((0, 2), keepdim=True)
    scale = (_pair_mean(query_power, half).clamp_min(_TINY) / _pair_mean(key_power, half).clamp_min(_TINY)) ** 0.25
    return scale / scale.log().mean(-1, keepdim=True).exp()


def _pair_mean(x: Tensor, half: int) -> Tensor:
    """Mean of channels i and i + ``half`` (the pairs RoPE rotates together) on both; channels
    beyond ``2 * half`` (not rotated) keep their own."""
    mean = (x[..., :half] + x[..., half : 2 * half]) / 2
    return torch.cat([mean, mean, x[..., 2 * half :]], -1)


def logit_error(
    queries: Tensor,
    keys: Tensor,
    conditioning: KeyConditioning,
    positions: Tensor,
    bits: int,
    method: str,
    seed: int,
    counted: Tensor | None = None,
) -> Tensor:
    """Relative error [B, H] of the attention logits q . k of ``queries`` [B, Hq, Q, d] over
    ``keys`` [B, H, T, d] once conditioned, encoded and decoded: the mean squared logit error
    over the variance of the exact logits across tokens (what softmax sees), pooled over each
    head's query group; only over the ``counted`` tokens [B, H, T] (default: all), 0 for a row
    with fewer than two. About the codec's relative error (~0.0075 at 4 bits) on well-behaved keys."""
    return logit_errors(queries, keys, [conditioning], positions, bits, method, seed, counted)[0]


def logit_errors(
    queries: Tensor,
    keys: Tensor,
    conditionings: list[KeyConditioning],
    positions: Tensor,
    bits: int,
    method: str,
    seed: int,
    counted: Tensor | None = None,
) -> list[Tensor]:
    """:func:`logit_error` of each conditioning, from one encode of all of them (a small encode
    costs mostly its fixed overhead; each vector is coded alone, so the codes are the same)."""
    tokens = keys.shape[-2]
    inputs = torch.cat([conditioning.forward(keys, positions) for conditioning in conditionings], dim=-2)
    decoded = decode(encode(inputs, bits, method, seed)).split(tokens, dim=-2)
    return [
        _relative_error(queries, keys, conditioning.inverse(part, positions), counted)
        for conditioning, part in zip(conditionings, decoded)
    ]


def _relative_error(queries: Tensor, keys: Tensor, restored: Tensor, counted: Tensor | None) -> Tensor:
    batch, heads, tokens, dim = keys.shape
    weights = torch.ones(batch, heads, tokens, device=keys.device) if counted is None else counted.float()
    count = weights.sum(-1)  # [B, H]
    weights = weights[:, :, None, :] / count.clamp_min(1)[..., None, None]
    grouped = queries.float().reshape(batch, heads, -1, dim)
    exact = grouped @ keys.float().transpose(-1, -2)  # [B, H, group * Q, T]
    error = grouped @ (restored - keys.float()).transpose(-1, -2)
    mean = (exact * weights).sum(-1, keepdim=True)
    spread = ((exact - mean).pow(2) * weights).sum(-1).mean(-1)
    relative = (error.pow(2) * weights).sum(-1).mean(-1) / spread.clamp_min(_TINY)
    return torch.where(count >= 2, relative, torch.zeros_like(relative))
