"""NexusQuantCache inside transformers: exact at 16 bits, faithful to its codes when quantized."""

import pytest
import torch
from transformers import DeepseekV3Config, DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, decode, encode, pages
from nexusquant_cache.layer import NexusQuantLayer
from tests.tiny_models import MODELS, greedy, held_storage, prompt, tiny_llama


@pytest.fixture(params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


FULL = NexusQuantConfig(key_bits=16, value_bits=16)
SMALL_WINDOW = NexusQuantConfig(key_bits=3, value_bits=2, recent_window=8, block_size=4)


def generate(model, ids, cache, **kwargs):
    out = greedy(model, ids, cache=cache, **kwargs)
    return out.sequences, torch.stack(out.scores)


def test_full_precision_equals_dynamic_cache(model):
    ids = prompt()
    expected_tokens, expected_scores = generate(model, ids, DynamicCache(config=model.config))
    tokens, scores = generate(model, ids, NexusQuantCache(FULL, model=model))
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)


def test_full_precision_equals_dynamic_cache_with_left_padding_and_beams(model):
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding on the first row
    ids = ids.masked_fill(mask == 0, 0)
    for kwargs in ({}, {"num_beams": 3}):
        expected, _ = generate(model, ids, DynamicCache(config=model.config), attention_mask=mask, **kwargs)
        tokens, _ = generate(model, ids, NexusQuantCache(FULL, model=model), attention_mask=mask, **kwargs)
        assert torch.equal(tokens, expected), kwargs


def test_multi_turn_continues_from_the_cache(model):
    ids = prompt(batch=1)
    results = []
    for cache in (DynamicCache(config=model.config), NexusQuantCache(FULL, model=model)):
        first, _ = generate(model, ids, cache)
        follow_up = torch.cat([first, prompt(batch=1, length=5, seed=2)], dim=1)
        second, _ = generate(model, follow_up, cache)
        results.append(second)
    assert torch.equal(results[0], results[1])


def test_prefill_logits_are_not_changed_by_compression(model):
    ids = prompt()
    reference = model(ids).logits
    cache = NexusQuantCache(NexusQuantConfig(key_bits=2, value_bits=2, recent_window=0, block_size=1), model=model)
    torch.testing.assert_close(model(ids, cache=cache).logits, reference, atol=1e-5, rtol=0)
    assert cache.stats()["bytes"]["codes"] > 0  # the prefill tokens were encoded after the forward


def test_quantized_cache_serves_exactly_its_decoded_codes(model):
    """The continuation through the compressed cache equals a DynamicCache holding the decoded states."""
    ids = prompt()
    cache = NexusQuantCache(SMALL_WINDOW, model=model)
    model(ids, cache=cache)
    reference = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        layer.settle()
        keys, values = (torch.cat([s.old_states(), s.recent], dim=-2) for s in (layer.key_stream, layer.value_stream))
        reference.update(keys, values, index)
        if layer.is_sliding:
            reference.layers[index].cumulative_length = layer.seen
    step = prompt(length=6, seed=3)
    position_ids = torch.arange(40, 46).expand(2, -1)
    expected = model(step, cache=reference, position_ids=position_ids).logits
    actual = model(step, cache=cache, position_ids=position_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_tokens_are_encoded_once_in_blocks():
    torch.manual_seed(0)
    # Without conditioning, the codes are those of encode() itself.
    layer = NexusQuantLayer(
        NexusQuantConfig(key_bits=4, value_bits=16, recent_window=5, block_size=3, center_keys=False)
    )
    tokens = torch.randn(1, 2, 20, 16)
    returned = []
    for start, stop in [(0, 4), (4, 8), (8, 9), (9, 15), (15, 20)]:
        keys, values = layer.update(tokens[:, :, start:stop], tokens[:, :, start:stop])
        returned.append(keys)
        assert keys.shape[-2] == stop and torch.equal(values, tokens[:, :, :stop])  # 16-bit values stay exact
    # Whenever the window (5) + block (3) fills, everything older than the window is encoded:
    # after 8 tokens seen, tokens 0-2; after 15, tokens 3-9; after 20, tokens 10-14. Earlier
    # codes are never touched again.
    # Encoding happens when the layer settles: at its next use, after this forward's attention.
    # The quantized keys' window is held in float16 (float32 model), the 16-bit values' exactly.
    layer.settle()
    rounded = tokens.half().float()
    blocks = [encode(rounded[:, :, start:stop], 4) for start, stop in [(0, 3), (3, 10), (10, 15)]]
    stream = layer.key_stream
    assert torch.equal(stream.old.codes, torch.cat([b.codes for b in blocks], dim=-2))
    assert torch.equal(stream.old.scales, torch.cat([b.scales for b in blocks], dim=-1))
    assert torch.equal(stream.recent, tokens[:, :, 15:20].half())
    assert torch.equal(layer.value_stream.recent, tokens[:, :, 15:20])
    first = blocks[0]
    # What update returns: decoded old tokens, the held window, then this forward's tokens exact.
    torch.testing.assert_close(returned[-1][:, :, :3], decode(first))
    assert torch.equal(returned[-1][:, :, 10:15], rounded[:, :, 10:15])
    assert torch.equal(returned[-1][:, :, 15:], tokens[:, :, 15:20])
    assert layer.get_seq_length() == 20 and layer.get_mask_sizes(1) == (21, 0)


def test_window_beyond_float16_range_stays_full_width():
    layer = NexusQuantLayer(NexusQuantConfig(key_bits=4, value_bits=4, recent_window=8, block_size=4))
    small, huge = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 2, 16) * 1e6
    layer.update(small, small)
    assert layer.key_stream.recent.dtype == torch.float16
    keys, _ = layer.update(huge, huge)
    assert layer.key_stream.recent.dtype == torch.float32  # rounding to float16 would give inf
    assert torch.equal(keys[:, :, 3:], huge) and torch.equal(layer.key_stream.recent[:, :, 3:], huge)
    layer.update(small, small)
    assert layer.key_stream.recent.dtype == torch.float32 and torch.isfinite(layer.key_stream.recent).all()


@pytest.mark.parametrize("page_tokens", [3, 256])
@pytest.mark.parametrize("key_bits, value_bits", [(16, 2), (2, 16), (16, 16)])
def test_stats_count_the_storage_of_a_side_kept_at_16_bits(model, key_bits, value_bits, page_tokens, monkeypatch):
    monkeypatch.setattr(pages, "PAGE_TOKENS", page_tokens)
    config = NexusQuantConfig(key_bits=key_bits, value_bits=value_bits, recent_window=8, block_size=4)
    cache = NexusQuantCache(config, model=model)
    model(prompt(), cache=cache)
    stats = cache.stats()  # the first retirement: the old part is cut from the prefill's window
    assert stats["bytes"]["total"] == held_storage(cache)
    model(prompt()[:, :6], cache=cache)  # a second block fills the last page up, then new pages
    assert cache.stats()["bytes"]["total"] == held_storage(cache)


@pytest.mark.parametrize("page_tokens", [3, 256])
def test_stats_count_every_tensor_held(model, page_tokens, monkeypatch):
    monkeypatch.setattr(pages, "PAGE_TOKENS", page_tokens)
    cache = NexusQuantCache(SMALL_WINDOW, model=model)
    model(prompt(), cache=cache)
    stats = cache.stats()
    held = held_storage(cache)
    assert stats["bytes"]["total"] == held and stats["tokens_seen"] == stats["tokens_stored"] == 40
    assert stats["ratio"] == stats["baseline_bytes"] / held
    assert len(cache.layers[0].key_stream.pages.pages) == -(-cache.layers[0].key_stream.old_length // page_tokens)


def stored_keys(layer):
    """The keys a settled layer would hand to the next forward."""
    layer.settle()
    stream = layer.key_stream
    recent = stream.recent.to(stream.dtype)
    return recent if stream.old is None else torch.cat([stream.old_states(), recent], dim=-2)


def test_batch_operations_cover_codes_scales_and_window():
    torch.manual_seed(0)
    layer = NexusQuantLayer(SMALL_WINDOW)
    states = torch.randn(3, 2, 30, 16)
    layer.update(states, states)
    before = stored_keys(layer)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(stored_keys(layer), before[[2, 0, 0]])
    layer.batch_select_indices(torch.tensor([0]))
    layer.batch_repeat_interleave(2)
    assert torch.equal(stored_keys(layer), before[[2, 2]])


def test_reset_empties_the_cache(model):
    cache = NexusQuantCache(SMALL_WINDOW, model=model)
    model(prompt(), cache=cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    expected = model(prompt(seed=5)).logits
    torch.testing.assert_close(model(prompt(seed=5), cache=cache).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype).eval()
    expected, expected_scores = generate(model, prompt(), DynamicCache(config=model.config))
    exact, _ = generate(model, prompt(), NexusQuantCache(FULL, model=model))
    assert torch.equal(exact, expected)
    cache = NexusQuantCache(SMALL_WINDOW, model=model)
    tokens, scores = generate(model, prompt(), cache)
    assert cache.layers[0].key_stream.recent.dtype == dtype
    assert cache.layers[0].key_stream.old_states().dtype == dtype  # decodes back to the model's dtype
    torch.testing.assert_close(scores[0], expected_scores[0])  # the prefill is never quantized
    assert torch.isfinite(scores).all()


def test_without_a_model_layers_are_created_on_use():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    cache = NexusQuantCache(FULL)
    expected, _ = generate(model, prompt(), DynamicCache())
    tokens, _ = generate(model, prompt(), cache)
    assert torch.equal(tokens, expected) and len(cache.layers) == 3


def test_latent_attention_models_are_refused():
    with pytest.raises(NotImplementedError, match="deepseek_v3"):
        NexusQuantCache(model_config=DeepseekV3Config(num_hidden_layers=2))


def test_assisted_decoding_rollback_is_refused():
    assert NexusQuantLayer.is_croppable is False
    cache = NexusQuantCache(NexusQuantConfig(), model=tiny_llama())
    with pytest.raises(NotImplementedError, match="a NexusQuantCache cannot be cropped"):
        cache.crop(3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("key_bits", 5, r"`key_bits` must be one of \(2, 3, 4, 16\) but got 5"),
        ("value_bits", 1, "`value_bits` must be one of"),
        ("recent_window", -1, "`recent_window` must be an integer >= 0 but got -1"),
        ("block_size", 0, "`block_size` must be an integer >= 1"),
        ("method", "pq", "`method` must be one of"),
        ("seed", 1.5, "`seed` must be an integer"),
        # round floats and out-of-range seeds used to pass here and fail later (torch, JSON)
        ("key_bits", 4.0, r"`key_bits` must be one of \(2, 3, 4, 16\) but got 4.0"),
        ("value_bits", 2.0, "`value_bits` must be one of"),
        ("seed", 2**64, r"`seed` must be an integer in \[0, 9223372036854775807\] but got 18446744073709551616"),
        ("block_size", True, "`block_size` must be an integer"),
        ("keep_ratio", float("nan"), "`keep_ratio` must be a number in"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        NexusQuantConfig(**{field: value})


def test_config_takes_numpy_numbers_as_python_ones():
    import json

    import numpy as np

    config = NexusQuantConfig(
        key_bits=np.int64(3), seed=np.uint32(7), keep_ratio=np.float32(0.5), block_size=np.int8(8)
    )
    assert config == NexusQuantConfig(key_bits=3, seed=7, keep_ratio=0.5, block_size=8)
    assert all(type(getattr(config, name)) is int for name in ("key_bits", "seed", "block_size"))
    assert type(config.keep_ratio) is float
    json.dumps(config.to_dict())  # what save writes


def test_config_is_hashable_and_its_overrides_frozen():
    import copy
    import pickle

    config = NexusQuantConfig(layer_overrides={"1": {"key_bits": 16}})
    assert config.layer_overrides == {1: {"key_bits": 16}}
    assert hash(config) == hash(NexusQuantConfig(layer_overrides={1: {"key_bits": 16}})) and {config: 1}
    with pytest.raises(TypeError):
        config.layer_overrides[2] = {"key_bits": 16}
    with pytest.raises(TypeError):
        config.layer_overrides[1]["key_bits"] = 2
    assert config.to_dict()["layer_overrides"] == {1: {"key_bits": 16}}
    assert copy.deepcopy(config) is config and pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({1.7: {"key_bits": 16}}, r"keys must be layer indices \(integers\) but got 1.7"),
        ({True: {"key_bits": 16}}, r"keys must be layer indices \(integers\) but got True"),
        ({"0": {"key_bits": 16}, 0: {"value_bits": 16}}, "names layer 0 twice"),
        ({0: {"key_bits": 5}}, r"`layer_overrides\[0\]`: `key_bits` must be one of"),
        ({"\u00b2": {"key_bits": 16}}, "keys must be layer indices"),  # a superscript two is no index
        ({"\u0661": {"key_bits": 16}}, "keys must be layer indices"),  # nor an Arabic-Indic one
    ],
)
def test_layer_overrides_refuse_ambiguous_indices(overrides, message):
    with pytest.raises(ValueError, match=message):
        NexusQuantConfig(layer_overrides=overrides)


def test_layer_overrides_must_name_layers_of_the_model():
    model = tiny_llama()  # 3 layers
    for overrides, message in (
        ({3: {"key_bits": 16}}, r"names layers \[3\], but the model has 3 \(indices -3 to 2\)"),
        ({-4: {"key_bits": 16}}, r"names layers \[-4\]"),
        ({0: {"key_bits": 16}, -3: {"value_bits": 16}}, r"names layers \[0\] twice \(also as \[-3\]\)"),
    ):
        with pytest.raises(ValueError, match=message):
            NexusQuantCache(NexusQuantConfig(layer_overrides=overrides), model=model)


def test_a_token_budget_below_what_a_layer_always_holds_says_why():
    with pytest.raises(ValueError, match=r"`token_budget` must be an integer >= 196 .*sink_tokens \+ recent_window"):
        NexusQuantConfig(token_budget=10)


def test_an_evicting_layer_refuses_positions_beyond_int32():
    layer = NexusQuantLayer(NexusQuantConfig(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="keynorm"))
    states = torch.randn(1, 2, 3, 16)
    layer.update(states, states)
    layer.seen = 2**31 - 2
    with pytest.raises(ValueError, match=r"holds positions as int32: at most 2\^31 - 1 tokens"):
        layer.update(states, states)


def test_config_from_something_else_than_a_dict_says_so():
    with pytest.raises(ValueError, match="made from a dict of its fields but got None"):
        NexusQuantConfig.from_dict(None)


def test_config_round_trips_through_a_dict():
    config = NexusQuantConfig(key_bits=3, value_bits=2, recent_window=32)
    assert NexusQuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown NexusQuantConfig fields \\['keep'\\]"):
        NexusQuantConfig.from_dict({"keep": 0.5})
    with pytest.raises(TypeError, match="NexusQuantConfig"):
        NexusQuantCache({"key_bits": 3})


def test_sliding_layers_keep_transformers_window_semantics():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    torch.manual_seed(0)
    exact = NexusQuantLayer(FULL, sliding_window=12)
    quantized = NexusQuantLayer(
        NexusQuantConfig(key_bits=2, value_bits=3, recent_window=4, block_size=2), sliding_window=12
    )
    reference = DynamicSlidingWindowLayer(sliding_window=12)
    tokens = torch.randn(2, 1, 40, 16)
    start = 0
    for length in [5, 3, 1, 9, 1, 1, 14, 1, 5]:
        chunk = tokens[:, :, start : start + length]
        start += length
        assert exact.get_mask_sizes(length) == quantized.get_mask_sizes(length) == reference.get_mask_sizes(length)
        expected, _ = reference.update(chunk, chunk)
        assert torch.equal(exact.update(chunk, chunk)[0], expected)
        keys, values = quantized.update(chunk, chunk)
        assert keys.shape == expected.shape and torch.equal(keys[:, :, -length:], chunk)  # new tokens exact
        assert exact.get_seq_length() == quantized.get_seq_length() == reference.get_seq_length() == start
    quantized.settle()
    assert quantized.key_stream.length == 11 and quantized.key_stream.recent.shape[-2] <= 4 + 2
    assert quantized.get_max_length() == 12 and quantized.is_sliding


def test_layer_overrides_keep_chosen_layers_exact():
    import json

    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(
        key_bits=2,
        value_bits=2,
        recent_window=4,
        block_size=4,
        layer_overrides={0: {"key_bits": 16}, -1: {"key_bits": 16, "value_bits": 16}},
    )
    assert NexusQuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    cache = NexusQuantCache(config, model=model)
    ids = prompt()
    model(ids, cache=cache)
    reference = DynamicCache()
    model(ids, cache=reference)
    first, middle, last = cache.layers
    for layer in cache.layers:
        layer.settle()
    assert torch.equal(first.key_stream.old, reference.layers[0].keys[..., :36, :])  # exact keys
    assert first.value_stream.old.bits == 2 and middle.key_stream.old.bits == 2
    assert torch.equal(last.value_stream.old, reference.layers[2].values[..., :36, :])
    with pytest.raises(ValueError, match="may set only 'key_bits' and 'value_bits'"):
        NexusQuantConfig(layer_overrides={0: {"keep_ratio": 0.5}})
    with pytest.raises(ValueError, match="needs the model's layers"):
        NexusQuantCache(config)


def test_chunked_prefill_compresses_between_chunks(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(length=120)
    config = NexusQuantConfig(key_bits=3, value_bits=2, keep_ratio=0.5, recent_window=8, block_size=4, scorer="snapkv")
    cache = NexusQuantCache(config, model=model)
    largest = []
    original = NexusQuantLayer.update

    def spy(self, key_states, value_states, *args, **kwargs):
        out = original(self, key_states, value_states, *args, **kwargs)
        largest.append(self.key_stream.recent.shape[-2])  # full-precision tokens held right now
        return out

    monkeypatch.setattr(NexusQuantLayer, "update", spy)
    greedy(model, ids, max_new_tokens=3, cache=cache, prefill_chunk_size=16)
    assert max(largest) <= 16 + config.recent_window + config.block_size
    assert cache.stats()["tokens_stored"] < 120 * 0.5 + config.block_size + 3
    expected, _ = generate(model, ids, DynamicCache(config=model.config), prefill_chunk_size=16)
    tokens, _ = generate(model, ids, NexusQuantCache(FULL, model=model), prefill_chunk_size=16)
    assert torch.equal(tokens, expected)


def test_presets_are_valid_configs_and_can_be_overridden():
    assert NexusQuantConfig.preset("lossless").key_bits == 4
    assert NexusQuantConfig.preset("max").keep_ratio == 0.25
    assert NexusQuantConfig.preset("balanced", seed=3).seed == 3
    assert NexusQuantConfig.preset("compact").keep_ratio == 1  # the no-eviction point
    assert NexusQuantConfig.preset("8x").target_ratio == 8 and NexusQuantConfig.preset("16x").value_bits == 2
    with pytest.raises(
        ValueError, match="`preset` must be one of \\['lossless', 'compact', 'balanced', 'max', '8x', '16x'\\]"
    ):
        NexusQuantConfig.preset("tiny")


def test_centred_keys_remove_a_shared_channel_offset():
    torch.manual_seed(0)
    offset = torch.zeros(64)
    offset[:4] = 40.0  # a few huge channels, as in Gemma 3's global layers
    keys = torch.randn(1, 2, 100, 64) + offset
    errors = {}
    for center in (False, None):  # off, automatic (no model: no RoPE, so the plain mean)
        layer = NexusQuantLayer(
            NexusQuantConfig(key_bits=3, value_bits=16, recent_window=0, block_size=1, center_keys=center)
        )
        layer.update(keys, keys)
        stored = stored_keys(layer)
        errors[center] = ((stored - keys) ** 2).sum() / ((keys - keys.mean(-2, keepdim=True)) ** 2).sum()
    stream = layer.key_stream
    sinks = layer.config.sink_tokens  # stored exactly, left out of the mean
    mean = keys[:, :, sinks:].half().float().mean(-2, keepdim=True)  # float16 window
    torch.testing.assert_close(stream.conditioning.offset, mean)
    torch.testing.assert_close(stored_keys(layer)[:, :, sinks:], decode(stream.old)[:, :, sinks:] + mean)
    assert torch.equal(stored_keys(layer)[:, :, :sinks], keys[:, :, :sinks].half().float())
    # float32 offsets, float16 sink keys (as the window held them), int64 sink indices and position shift
    assert layer.nbytes()["metadata"] == 2 * 64 * 4 + 2 * sinks * 64 * 2 + 2 * sinks * 8 + 8
    assert errors[None] < 0.05 < 0.5 < errors[False]  # error relative to the tokens' own spread
    with pytest.raises(ValueError, match="`center_keys` must be None \\(automatic\\), True or False"):
        NexusQuantConfig(center_keys="yes")
