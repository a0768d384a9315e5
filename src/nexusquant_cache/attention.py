"""Attention over a layer's stored tokens in the codec's rotated domain: the decode path.

The codec stores ``y = R x`` (R its randomized Hadamard rotation, orthogonal) as codeword units
(:func:`~nexusquant_cache.codec.decode_units`). So ``q . R^T y = (R q) . y`` and
``sum_t a_t R^T y_t = R^T sum_t a_t y_t``: a step rotates each query once and each output once,
and reads the codes with one table lookup per stage, instead of turning every stored token back
(a d x d product per token) and adding its key offset back (a cos and sin per token).

Key conditioning (conditioning.py) is undone on the query side as well. A key is stored as
``sigma * (k - R_p o)`` (``o`` the offset, ``R_p`` RoPE at the token's position p, ``sigma`` a
per-channel scale), so ``q . k = (q / sigma) . decoded + q . R_p o``; the second term is a small
product of the query with a table of cos and sin by position (:meth:`Rope.trig`), shared by
every layer with the same frequencies. The attention sinks' exact keys replace their logits.

Plain torch; knows nothing of transformers: masks follow SDPA's convention (bool, True = attend,
or additive float; None = causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .codec import Encoded, Tiered, decode_units, rotation_matrix
from .conditioning import KeyConditioning

__all__ = ["Codes", "Scratch", "StoredKeys", "attend", "biased_mask", "codes_of"]

_TABLE_POSITIONS = 1 << 16  # Rope.trig tables are asked for at most 64k positions (16 MB at head_dim 64)


class Scratch:
    """Buffers that every layer's step reuses (layers run one after another): the codes read for
    attention go here, so a step allocates no [tokens x head_dim] tensor once the buffers have
    grown to the longest layer. They grow in pages of ``PAGE`` elements."""

    PAGE = 1 << 16

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous [shape] tensor of ``dtype``; the previous contents of ``name`` are lost."""
        count = 1
        for size in shape:
            count *= size
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            pages = -(-count // self.PAGE)
            with torch.inference_mode(False):  # written inside and outside inference mode alike
                buffer = self._buffers[key] = torch.empty(pages * self.PAGE, dtype=dtype, device=device)
        return buffer[:count].view(shape)

    def __deepcopy__(self, memo: dict) -> "Scratch":
        return Scratch()  # nothing in it outlives a step

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


@dataclass
class Codes:
    """Old tokens as the codec holds them: ``factor[..., None] * (units - bias)`` is the rotated
    vector (rotation ``seed``); units [B, H, T, d] and factor [B, H, T] float32."""

    units: Tensor
    factor: Tensor
    bias: float
    seed: int


def codes_of(old: list[Encoded] | list[Tiered], scratch: Scratch, name: str) -> Codes:
    """Read the pages ``old`` (joined along the tokens) into ``scratch`` buffer ``name`` for one step's attention.
    The units are float32 whatever the model's dtype: at 4 bits they are biased integers up to 70,
    whose products with the query float16 or bfloat16 would round (or overflow) far more than
    the keys themselves do."""
    batch, heads, _, dim = old[0].shape
    tokens = sum(page.scales.shape[-1] for page in old)
    out = scratch.take(name, (batch, heads, tokens, dim), torch.float32, old[0].scales.device)
    if isinstance(old[0], Tiered):
        tiered = old[0] if len(old) == 1 else Tiered.concat(old)
        second = scratch.take(f"{name}.second", (len(tiered.second), dim), torch.float32, out.device)
        units, factor, bias = tiered.units(out, second)
    else:
        units, factor, bias = decode_units(old, torch.float32, out)
    return Codes(units, factor, bias, old[0].seed)


@dataclass
class StoredKeys:
    """What attention needs of a layer's old keys: ``old`` as codes or as states (16 bits, or
    kept exact by the guard); the ``conditioning`` they were encoded under and the positions
    [B or 1, H or 1, T] it needs; the sinks' ``exact`` keys [B, H, S, d] at ``exact_index``
    [B, H, S] among the old tokens (-1: none; ``sinks_held``: none is -1)."""

    old: Codes | Tensor
    conditioning: KeyConditioning | None = None
    positions: Tensor | None = None
    exact: Tensor | None = None
    exact_index: Tensor | None = None
    sinks_held: bool = False  # whether every slot holds a token


def attend(
    query: Tensor,
    keys: StoredKeys,
    old_values: Codes | Tensor,
    window_keys: Tensor,
    window_values: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    causal: bool = True,
    logit_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` [B, Hq, L, d] over the old tokens then the window ``window_keys``
    / ``window_values`` [B, Hkv, W, d] (exact; the queries' own tokens last); ``logit_bias``
    [B, Hkv, T_old] is added to the old tokens' logits (merged tokens, layer.py).

    Returns the output [B, L, Hq, d] (as transformers' attention functions do) and the
    attention weights [B, Hkv, Hq / Hkv, L, T + W] float32 (for eviction scores)."""
    batch, query_heads, length, dim = query.shape
    kv_heads = window_keys.shape[1]
    groups = query_heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * length, dim)  # kv head j serves query heads j*g .. j*g+g-1
    logits = torch.cat([_key_logits(grouped, keys), _dot(grouped, window_keys)], -1).mul_(scaling)
    if logit_bias is not None:
        old = logit_bias.shape[-1]
        logits[..., :old] += logit_bias[..., None, :].float()
    logits = logits.view(batch, kv_heads, groups, length, -1)
    total = logits.shape[-1]
    if attention_mask is None:  # causal: query i sits at total - length + i
        if causal and length > 1:
            rows = torch.arange(total - length, total, device=query.device)[:, None]
            logits.masked_fill_(torch.arange(total, device=query.device) > rows, float("-inf"))
    else:
        mask = attention_mask[..., -total:]
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(-1, kv_heads, groups, length, total)
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    weights = torch.nan_to_num(logits.softmax(-1))  # a fully masked row (padding) attends to nothing
    probabilities = torch.nn.functional.dropout(weights, dropout) if dropout else weights
    probabilities = probabilities.view(batch, kv_heads, groups * length, total)
    old = total - window_values.shape[-2]
    out = _weighted(probabilities[..., :old], old_values)
    out += probabilities[..., old:].to(window_values.dtype) @ window_values
    out = out.view(batch, query_heads, length, dim).transpose(1, 2).contiguous()
    return out.to(query.dtype), weights


def biased_mask(attention_mask: Tensor | None, logit_bias: Tensor, query: Tensor, causal: bool) -> Tensor:
    """SDPA's additive mask [B, Hq, L, T] in ``query``'s dtype: ``attention_mask`` (bool, additive
    float, or None for causal when ``causal``) plus ``logit_bias`` [B, Hkv, T] for every query
    head of each KV head's group (a per-head bias has no place in transformers' one mask)."""
    batch, query_heads, length, _ = query.shape
    total = logit_bias.shape[-1]
    if attention_mask is None:
        base = torch.zeros(length, total, device=query.device)
        if causal and length > 1:  # query i sits at total - length + i
            rows = torch.arange(total - length, total, device=query.device)[:, None]
            base.masked_fill_(torch.arange(total, device=query.device) > rows, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[..., -total:]
        base = torch.zeros(mask.shape, device=query.device).masked_fill_(~mask, float("-inf"))
    else:
        base = attention_mask[..., -total:].float()
    per_head = logit_bias.float().repeat_interleave(query_heads // logit_bias.shape[1], dim=1)[..., None, :]
    return (base + per_head).to(query.dtype)


def _dot(query: Tensor, states: Tensor) -> Tensor:
    """Logits [B, H, Q, T] float32 of ``query`` [B, H, Q, d] against ``states`` [B, H, T, d]."""
    return (query.to(states.dtype) @ states.transpose(-1, -2)).float()


def _key_logits(query: Tensor, keys: StoredKeys) -> Tensor:
    """``q . k`` [B, H, Q, T] float32 for every old key, without reconstructing them."""
    old = keys.old
    if not isinstance(old, Codes):
        return _dot(query, old)
    conditioning = keys.conditioning
    turned = exact_query = query.float()
    if conditioning is not None and conditioning.scale is not None:
        turned = turned / conditioning.scale
    turned = turned @ rotation_matrix(turned.shape[-1], old.seed, turned.device).T  # R (q / sigma)
    logits = _dot(turned, old.units)
    if old.bias:
        logits -= old.bias * turned.sum(-1, keepdim=True)
    logits *= old.factor[..., None, :]
    if conditioning is not None:
        logits += _offset_logits(exact_query, conditioning, keys.positions, logits.shape[-1])
    if keys.exact is not None:
        exact = _dot(query, keys.exact.to(query.dtype))  # [B, H, Q, S]
        if keys.sinks_held:
            logits.scatter_(-1, keys.exact_index[..., None, :].expand_as(exact), exact)
        else:  # added as a difference: slots not held (-1) add nothing wherever they point
            held = (keys.exact_index >= 0)[..., None, :]
            index = keys.exact_index.clamp(min=0)[..., None, :].expand_as(exact)
            logits.scatter_add_(-1, index, torch.where(held, exact - logits.gather(-1, index), 0.0))
    return logits


def _offset_logits(query: Tensor, conditioning: KeyConditioning, positions: Tensor, count: int) -> Tensor:
    """``q . R_p o`` [B, H, Q, T or 1] for the old keys' positions (one value without RoPE)."""
    offset, rope = conditioning.offset, conditioning.rope  # offset [B, H, 1, d]
    if rope is None:
        return query @ offset.transpose(-1, -2)
    half = rope.inv_freq.shape[0]
    q1, q2, o1, o2 = query[..., :half], query[..., half : 2 * half], offset[..., :half], offset[..., half : 2 * half]
    # R_p o = a (o1 cos - o2 sin, o2 cos + o1 sin, rest), so
    # q . R_p o = a cos . (q1 o1 + q2 o2) + a sin . (q2 o1 - q1 o2) + q_rest . o_rest
    coefficients = torch.cat([q1 * o1 + q2 * o2, q2 * o1 - q1 * o2], -1)  # [B, H, Q, 2 half]
    positions = positions[..., :count]
    first, last = int(positions[..., 0].min()), int(positions[..., -1].max())
    if positions.shape[:2] == (1, 1) and first >= 0 and last - first == count - 1 and last < _TABLE_POSITIONS:
        # Consecutive positions (ascending, all distinct): the shared table's rows as they are.
        logits = coefficients @ rope.trig(last + 1, query.device, _TABLE_POSITIONS)[first : last + 1].T
    elif last < min(_TABLE_POSITIONS, 4 * count + 1024):  # one product with the table, then a gather
        by_position = coefficients @ rope.trig(last + 1, query.device, _TABLE_POSITIONS).T  # [B, H, Q, P]
        index = positions.clamp(min=0).long()  # padding's negative positions: masked anyway
        logits = by_position.gather(-1, index[..., None, :].expand(*by_position.shape[:-1], count))
    else:  # sparse or far positions: cos and sin at the positions held
        logits = coefficients @ rope.trig_at(positions.clamp(min=0)).transpose(-1, -2)
    if 2 * half < query.shape[-1]:  # partial RoPE: the channels it leaves alone
        logits = logits + query[..., 2 * half :] @ offset[..., 2 * half :].transpose(-1, -2)
    return logits


def _weighted(probabilities: Tensor, old: Codes | Tensor) -> Tensor:
    """``sum_t p_t v_t`` [B, H, Q, d] float32 over the old values."""
    if not isinstance(old, Codes):
        return (probabilities.to(old.dtype) @ old).float()
    weights = probabilities * old.factor[..., None, :]
    rotated = (weights.to(old.units.dtype) @ old.units).float()
    if old.bias:
        rotated -= old.bias * weights.sum(-1, keepdim=True)
    return rotated @ rotation_matrix(rotated.shape[-1], old.seed, rotated.device)  # R^T
