"""``merge_bias``: a merged token's logits get log n, n the tokens it stands for (layer.py)."""

import copy
import math
import pickle
import warnings

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.attention import StoredKeys, attend, biased_mask
from nexusquant_cache.policy import PAD
from tests.tiny_models import prompt, tiny_llama

MERGED = dict(
    key_bits=4, value_bits=2, keep_ratio=0.5, recent_window=8, block_size=4, sink_tokens=2,
    merge="keys_values", merge_bias=True,
)  # fmt: skip


def reference_attention(query, keys, values, copies, allowed, scaling):
    """Per KV head, attention over ``keys`` with token t repeated ``copies[h][t]`` times."""
    batch, query_heads, length, dim = query.shape
    groups = query_heads // keys.shape[1]
    out = torch.empty(batch, length, query_heads, dim)
    for head in range(query_heads):
        kv = head // groups
        index = torch.tensor([t for t, n in enumerate(copies[kv]) for _ in range(n)])
        logits = query[:, head] @ keys[:, kv, index].transpose(-1, -2) * scaling
        logits = logits.masked_fill(~allowed[:, None, index] if allowed.dim() == 2 else ~allowed[..., index], -math.inf)
        out[:, :, head] = logits.softmax(-1) @ values[:, kv, index]
    return out


@pytest.mark.parametrize("length", [1, 3])
def test_a_bias_of_log_n_attends_as_n_copies_of_the_token(length):
    """Both attention paths: the cache's own (attend) and SDPA with biased_mask."""
    torch.manual_seed(0)
    old, window, dim = 6, 3, 8
    query = torch.randn(2, 4, length, dim)
    keys, values = torch.randn(2, 2, old + window, dim), torch.randn(2, 2, old + window, dim)
    copies = [[1, 3, 1, 1, 2, 1] + [1] * window, [4, 1, 1, 2, 1, 1] + [1] * window]
    bias = torch.tensor([row[:old] for row in copies]).float().log()[None].expand(2, -1, -1)
    allowed = torch.ones(2, length, old + window, dtype=torch.bool)
    allowed[1, :, 1] = False  # a masked token: its copies are masked too
    allowed &= torch.arange(old + window) <= torch.arange(old + window - length, old + window)[:, None]
    expected = reference_attention(query, keys, values, copies, allowed, 0.3)
    out, _ = attend(
        query, StoredKeys(keys[:, :, :old]), values[:, :, :old], keys[:, :, old:], values[:, :, old:],
        allowed[:, None], 0.3, logit_bias=bias,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    full = torch.nn.functional.pad(bias, (0, window))
    mask = biased_mask(allowed[:, None], full, query, causal=True)
    assert mask.shape == (2, 4, length, old + window)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(sdpa.transpose(1, 2), expected, atol=1e-5, rtol=0)
    if length == 1:  # no mask: a single query attends to everything
        expected = reference_attention(query, keys, values, copies, torch.ones_like(allowed), 0.3)
        mask = biased_mask(None, full, query, causal=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
        )
        torch.testing.assert_close(sdpa.transpose(1, 2), expected, atol=1e-5, rtol=0)


def padded(length=60, pads=5):
    ids = prompt(batch=2, length=length)
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    return ids, mask


def test_merged_tokens_stand_for_every_real_token_seen():
    """exp(bias) summed over the stored tokens of each row and head is the real tokens seen (no
    padding), through prefill and decode; tokens never merged and the window hold 0."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids, mask = padded()
    cache = NexusQuantCache(NexusQuantConfig(**MERGED), model=model)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    seen = cache.get_seq_length()
    for layer in cache.layers:
        layer.settle()
        real = (layer.positions != PAD).sum(-1)
        stands_for = layer.logit_bias.float().exp().masked_fill(layer.positions == PAD, 0).sum(-1)
        expected = torch.tensor([seen, seen - 5])[:, None].expand_as(stands_for).float()
        torch.testing.assert_close(stands_for, expected, rtol=2e-3, atol=0)  # float16 logs
        assert (real < expected).all()  # tokens were merged
        assert (layer.logit_bias[..., layer.key_stream.old_length :] == 0).all()
        assert (layer.logit_bias >= 0).all() and (layer.logit_bias > 0).any()


def prefilled():
    """A tiny Llama and a merging cache holding its 60-token prompt (2 rows)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(batch=2, length=60)
    cache = NexusQuantCache(NexusQuantConfig(**MERGED), model=model)
    with torch.no_grad():
        model(ids, cache=cache)
    return model, ids, cache


def run(cache, model, ids, steps=4, grad=False):
    logits = []
    with torch.set_grad_enabled(grad):
        for step in range(steps):
            logits.append(model(ids[:, step : step + 1], cache=cache).logits)
    return torch.cat(logits, 1)


def test_decode_steps_apply_the_bias_on_both_attention_paths():
    """The rotated-domain decode path and SDPA over decoded states (autograd keeps the latter)
    give the same logits; zeroing the bias changes them, so it is really applied."""
    model, ids, cache = prefilled()
    with torch.no_grad():
        run(cache, model, ids, steps=2)  # the first step confirms the route
    assert cache.layers[0]._route_confirmed
    reference, unbiased = copy.deepcopy(cache), copy.deepcopy(cache)
    for layer in unbiased.layers:
        layer.logit_bias = torch.zeros_like(layer.logit_bias)
    rotated = run(cache, model, ids)
    torch.testing.assert_close(run(reference, model, ids, grad=True).detach(), rotated, atol=1e-5, rtol=0)
    assert (run(unbiased, model, ids) - rotated).abs().max() > 1e-2


def test_the_bias_is_saved_loaded_and_checked(tmp_path):
    model, ids, cache = prefilled()
    cache.save(tmp_path / "merged.nqc")
    loaded = NexusQuantCache.load(tmp_path / "merged.nqc", model=model)
    for ours, theirs in zip(cache.layers, loaded.layers):
        assert torch.equal(ours.logit_bias, theirs.logit_bias)
    torch.testing.assert_close(run(loaded, model, ids), run(cache, model, ids), atol=0, rtol=0)
    tensors, state = cache.layers[0].state_tensors()
    for bad in (-1.0, 40.0):
        forged = {**tensors, "logit_bias": torch.full_like(tensors["logit_bias"], bad)}
        with pytest.raises(ValueError, match=r"logit_bias must lie in \[0, 21.5\]"):
            copy.deepcopy(cache.layers[0]).restore(forged, state)
    with pytest.raises(ValueError, match="logit_bias must be float16"):
        copy.deepcopy(cache.layers[0]).restore({**tensors, "logit_bias": tensors["logit_bias"].float()}, state)


def test_merge_bias_settings_and_warnings():
    with pytest.raises(ValueError, match="`merge_bias` must be True or False but got 1"):
        NexusQuantConfig(merge="values", merge_bias=1)
    with pytest.raises(ValueError, match="`merge` is 'off'"):
        NexusQuantConfig(merge_bias=True)
    assert NexusQuantConfig.from_dict(NexusQuantConfig(**MERGED).to_dict()).merge_bias
    model = tiny_llama().eval()
    with pytest.warns(UserWarning, match="`merge_bias` .* needs `model=`"):
        NexusQuantCache(NexusQuantConfig(**MERGED), model_config=model.config)
    cache = NexusQuantCache(NexusQuantConfig(**MERGED), model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pickle.loads(pickle.dumps(cache))
    assert any("attend without their logit bias (an unpickled cache has no model)" in str(w.message) for w in caught)


def test_batch_operations_carry_the_bias():
    """Beams reorder the rows: the reordered cache decodes as the original's rows, swapped."""
    model, ids, cache = prefilled()
    cache.stats()  # settled: the tokens that left the window merged
    swapped = copy.deepcopy(cache)
    swapped.reorder_cache(torch.tensor([1, 0]))
    for ours, theirs in zip(cache.layers, swapped.layers):
        assert torch.equal(theirs.logit_bias, ours.logit_bias.flip(0))
    torch.testing.assert_close(run(swapped, model, ids.flip(0)), run(cache, model, ids).flip(0), atol=1e-5, rtol=0)


def test_a_file_with_a_bias_in_the_window_is_refused():
    """Only encoded tokens absorb others: a bias on a window token would reach SDPA but not the decode path."""
    _, _, cache = prefilled()
    tensors, state = cache.layers[0].state_tensors()
    forged = tensors["logit_bias"].clone()
    forged[..., -1] = 1.0
    with pytest.raises(ValueError, match="logit_bias must be 0 in the full-precision window"):
        copy.deepcopy(cache.layers[0]).restore({**tensors, "logit_bias": forged}, state)
