"""Eviction: exact against a reference that keeps only the same tokens, and the contract around it."""

import gc

import pytest
import torch
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, nexusquant_evict
from nexusquant_cache.layer import NexusQuantLayer
from nexusquant_cache.policy import PAD
from tests.tiny_models import MODELS, greedy, prompt, tiny_llama

PREFIX, STEP = 40, 6
EVICT = dict(key_bits=16, value_bits=16, keep_ratio=0.5, recent_window=8, block_size=4, sink_tokens=2)


def padded_prompt(pads: int):
    ids = prompt(length=PREFIX)
    mask = torch.ones_like(ids)
    mask[0, :pads] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate builds them: pads share position 0
    return ids.masked_fill(mask == 0, 0), mask, positions


def kept_reference(model, ids, mask, positions, cache):
    """A DynamicCache holding, per layer and head, exactly the tokens the evicting cache kept,
    taken from a full-precision prefill, and the 2D mask that goes with them."""
    full = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, position_ids=positions, cache=full)
    reference = DynamicCache(config=model.config)
    pads = (mask == 0).sum(-1)  # [B]
    kept_mask = None
    for index, (ours, theirs) in enumerate(zip(cache.layers, full.layers)):
        if ours.is_sliding:
            reference.layers[index] = theirs  # sliding layers are not evicted (and here 16-bit)
            continue
        ours.settle()
        assert (ours.positions != PAD).all()  # padding goes first
        columns = (ours.positions + pads[:, None, None]).long()  # original column of each kept token
        take = columns[..., None].expand(*columns.shape, theirs.keys.shape[-1])
        reference.update(theirs.keys.gather(2, take), theirs.values.gather(2, take), index)
        kept_mask = torch.ones(ids.shape[0], columns.shape[-1], dtype=mask.dtype)
    return reference, kept_mask


@pytest.mark.parametrize("name, pads", [("llama", 7), ("gpt2", 7), ("gemma3", 0)])
@pytest.mark.parametrize("scorer", ["keynorm", "snapkv"])
def test_eviction_equals_keeping_only_the_same_tokens(name, pads, scorer):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids, mask, positions = padded_prompt(pads)
    cache = NexusQuantCache(NexusQuantConfig(**EVICT, scorer=scorer), model=model)
    model(ids, attention_mask=mask, position_ids=positions, cache=cache)
    reference, kept_mask = kept_reference(model, ids, mask, positions, cache)
    stats = cache.stats()
    assert stats["tokens_seen"] == PREFIX and stats["tokens_stored"] == kept_mask.shape[-1] == 20
    step = prompt(length=STEP, seed=3)
    step_positions = positions[:, -1:] + 1 + torch.arange(STEP)
    ones = torch.ones(ids.shape[0], STEP, dtype=mask.dtype)
    # Without padding, no 2D mask: the sliding layers of a hybrid model index it by their own
    # offsets, which a shorter reference mask would not match.
    ours, theirs = (torch.cat([m, ones], -1) if pads else None for m in (mask, kept_mask))
    actual = model(step, attention_mask=ours, position_ids=step_positions, cache=cache)
    expected = model(step, attention_mask=theirs, position_ids=step_positions, cache=reference)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)


def test_every_layer_and_head_keeps_the_budget_with_sinks_and_window():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(
        key_bits=3, value_bits=2, keep_ratio=0.25, recent_window=16, block_size=8, sink_tokens=4, scorer="snapkv"
    )
    cache = NexusQuantCache(config, model=model)
    ids = prompt(length=200)
    model(ids, cache=cache)
    for _ in range(30):  # decoding: evictions come in blocks as the budget grows
        model(ids[:, :1], cache=cache)
    seen = 230
    stored = {layer.key_stream.length for layer in cache.layers}
    assert len(stored) == 1  # the mask is built once for all layers
    stored = stored.pop()
    assert config.budget(seen) <= stored < config.budget(seen) + config.block_size
    for layer in cache.layers:
        positions = layer.positions
        assert positions.shape == (2, 2, stored)
        assert (positions[..., :4] == torch.arange(4, dtype=positions.dtype)).all()  # sinks
        assert (positions[..., -16:] == torch.arange(seen - 16, seen, dtype=positions.dtype)).all()  # window
        assert (positions.diff(dim=-1) > 0).all()  # original order
        assert not torch.equal(positions[:, 0], positions[:, 1])  # heads choose for themselves
    stats = cache.stats()
    assert stats["tokens_stored"] == stored and stats["bytes"]["metadata"] > 0


def test_snapkv_scores_come_from_the_real_queries():
    """The captured scores equal the attention of the last queries, computed by eager attention."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(length=30)
    config = NexusQuantConfig(**{**EVICT, "keep_ratio": 0.9}, scorer="h2o")
    cache = NexusQuantCache(config, model=model)
    model(ids, cache=cache)
    eager = tiny_llama()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    attentions = eager(ids, output_attentions=True).attentions  # per layer [B, Hq, q, S]
    for layer, weights in zip(cache.layers, attentions):
        expected = weights.view(2, 2, 2, 30, 30).mean(2).sum(2)  # mean over each KV group, sum over queries
        torch.testing.assert_close(layer.scores.float(), expected, atol=2e-3, rtol=1e-3)  # stored as float16


def test_query_capture_is_undone_when_the_cache_is_gone():
    model = tiny_llama().eval()
    before = model.config._attn_implementation
    cache = NexusQuantCache(NexusQuantConfig(keep_ratio=0.5), model=model)
    second = NexusQuantCache(NexusQuantConfig(keep_ratio=0.5), model=model)
    assert model.config._attn_implementation == "nexusquant"
    del cache
    gc.collect()
    assert model.config._attn_implementation == "nexusquant"  # the second cache still needs it
    del second
    gc.collect()
    assert model.config._attn_implementation == before


def test_without_a_model_attention_scorers_fall_back_to_key_norm():
    with pytest.warns(UserWarning) as caught:
        cache = NexusQuantCache(NexusQuantConfig(keep_ratio=0.5, scorer="snapkv"))
    assert cache.scorer == "keynorm"
    messages = [str(w.message) for w in caught]
    assert any("'keynorm'" in m for m in messages) and any("evicts in every layer" in m for m in messages)


def test_nexusquant_evict_uses_the_cache_and_restores_the_model():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    state = (dict(vars(model)), model.config._attn_implementation)
    ids = prompt()
    with nexusquant_evict(model, keep_ratio=0.5, recent_window=8, block_size=4) as same:
        assert same is model and model.config._attn_implementation == "nexusquant"
        out = greedy(model, ids, max_new_tokens=5)  # through the patched model.generate
    assert isinstance(out.cache, NexusQuantCache) and out.cache.config.keep_ratio == 0.5
    del out
    gc.collect()
    assert (dict(vars(model)), model.config._attn_implementation) == state
    with pytest.raises(RuntimeError, match="boom"), nexusquant_evict(model, key_bits=2):
        raise RuntimeError("boom")
    assert (dict(vars(model)), model.config._attn_implementation) == state


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(
        key_bits=16, value_bits=16, keep_ratio=0.25, recent_window=8, block_size=4, sink_tokens=4, scorer="streaming"
    )
    cache = NexusQuantCache(config, model=model)
    model(prompt(length=100), cache=cache)
    layer = cache.layers[0]
    layer.settle()
    kept = layer.key_stream.length
    expected = torch.cat([torch.arange(4), torch.arange(100 - (kept - 4), 100)]).to(layer.positions.dtype)
    assert kept == config.budget(100) and layer.scores is None
    assert (layer.positions == expected).all()


def test_models_sdpa_cannot_serve_fall_back_to_key_norm():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
    )
    model = Gemma2ForCausalLM(config).eval()  # attention softcapping: SDPA cannot run it
    before = model.config._attn_implementation
    with pytest.warns(UserWarning, match="scoring with 'keynorm'"):
        cache = NexusQuantCache(NexusQuantConfig(keep_ratio=0.5, recent_window=8, block_size=4), model=model)
    assert cache.scorer == "keynorm" and model.config._attn_implementation == before
    ids = prompt()
    out = greedy(model, ids, max_new_tokens=4, cache=cache)
    assert out.sequences.shape == (2, 44) and cache.stats()["tokens_stored"] < 44


def test_learned_attention_sinks_keep_the_models_own_attention():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = GptOssForCausalLM(config).eval()  # learned sinks in the softmax: SDPA ignores them
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids, cache=DynamicCache(config=model.config)).logits
        with pytest.warns(UserWarning, match="scoring with 'keynorm'"):
            cache = NexusQuantCache(NexusQuantConfig(key_bits=16, value_bits=16, keep_ratio=0.5), model=model)
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(ids, cache=cache).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("merge", ["values", "keys_values"])
def test_merging_folds_each_evicted_token_into_its_most_similar_kept_one(merge):
    """Against a per-head loop: keynorm ranks, every token weighs 1, all tokens leave the
    window at once, so each evicted token merges into the kept token of highest cosine."""
    torch.manual_seed(0)
    config = NexusQuantConfig(
        key_bits=16, value_bits=16, keep_ratio=0.5, recent_window=0, block_size=1, sink_tokens=0,
        scorer="keynorm", merge=merge,
    )  # fmt: skip
    layer = NexusQuantLayer(config)
    keys, values = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    layer.update(keys, values)
    layer.settle()
    for b in range(2):
        for h in range(3):
            kept = (-keys[b, h].norm(dim=-1)).topk(6).indices.sort().values.tolist()
            sums = {t: [keys[b, h, t].clone(), values[b, h, t].clone(), 1] for t in kept}
            for e in set(range(12)) - set(kept):
                cosine = [torch.cosine_similarity(keys[b, h, e], keys[b, h, t], dim=0) for t in kept]
                target = kept[int(torch.stack(cosine).argmax())]
                sums[target][0] += keys[b, h, e]
                sums[target][1] += values[b, h, e]
                sums[target][2] += 1
            expected_keys = [s[0] / s[2] if merge == "keys_values" else keys[b, h, t] for t, s in sums.items()]
            expected_values = [s[1] / s[2] for s in sums.values()]
            torch.testing.assert_close(layer.key_stream.old[b, h], torch.stack(expected_keys))
            torch.testing.assert_close(layer.value_stream.old[b, h], torch.stack(expected_values))
            assert layer.positions[b, h].tolist() == kept


def test_merging_skips_pads_and_keeps_the_contract():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids, mask, positions = padded_prompt(pads=5)
    config = NexusQuantConfig(**{**EVICT, "key_bits": 4, "value_bits": 3}, merge="values")
    cache = NexusQuantCache(config, model=model)
    tokens = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=STEP, do_sample=False, pad_token_id=0)
    assert tokens.shape[1] == PREFIX + STEP
    for layer in cache.layers:
        assert (layer.positions != PAD).all()
        assert layer.key_stream.length == layer.value_stream.length == cache.stats()["tokens_stored"]
    with pytest.raises(ValueError, match="`merge` must be one of \\['off', 'values', 'keys_values'\\]"):
        NexusQuantConfig(merge="on")
