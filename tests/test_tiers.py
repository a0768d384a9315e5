"""Precision tiers: 4-bit E8 codes whose tokens can drop their second stage (codec/tiers.py), and
the cache that demotes its lowest-ranked tokens to 2 bits instead of evicting them."""

import random

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, encode, pages
from nexusquant_cache.codec import Tiered, decode, decode_units, rotation
from nexusquant_cache.codec.packing import unpack_words
from nexusquant_cache.codec.quantizers import quantizer
from nexusquant_cache.layer import NexusQuantLayer
from tests.test_attention import check_equal, decode_both
from tests.tiny_models import MODELS, held_storage, prompt, tiny_llama


def tiered(batch=2, heads=3, tokens=37, dim=64, seed=0):
    states = torch.randn(batch, heads, tokens, dim, generator=torch.Generator().manual_seed(seed))
    return states, encode(states, 4)


def points(codes):
    """The ball codewords [..., d] of 2-bit ``codes`` [..., d / 4] (brute dequantization)."""
    words = unpack_words(codes, 2)
    return quantizer("e8", 2).dequantize(words.reshape(-1)).view(*words.shape, 8).flatten(-2)


def test_a_tiered_copy_of_4_bit_codes_decodes_to_the_same_vectors():
    _, encoded = tiered()
    split = Tiered.of(encoded)
    assert torch.equal(split.decode(), decode(encoded))
    units, factor, bias = decode_units(encoded)
    tiered_units, tiered_factor, tiered_bias = split.units(torch.empty_like(units))
    assert torch.equal(tiered_factor[..., None] * (tiered_units - tiered_bias), factor[..., None] * (units - bias))
    # the bytes are the 4-bit codes split, plus one bit per token for the tier mask
    assert split.nbytes == encoded.nbytes + split.packed_full.numel()
    assert split.packed_full.shape[-1] == 5  # 37 tokens: 5 bytes


def test_demotion_keeps_the_first_stage_and_refits_the_scale():
    states, encoded = tiered()
    split = Tiered.of(encoded)
    mask = torch.rand(states.shape[:-1], generator=torch.Generator().manual_seed(1)) < 0.5
    demoted = split.demote(mask)
    assert torch.equal(demoted.first.codes, split.first.codes)  # first stages bit-identical
    assert torch.equal(demoted.full, ~mask)
    assert demoted.nbytes == split.nbytes - int(mask.sum()) * 16  # each demoted token gives up d/4 bytes
    # Reference: the least-squares scale of the first stage c1 against the 4-bit point c1 + c2 / 4.
    c1 = points(split.first.codes)
    c4 = c1 + points(split.second.view(*mask.shape, -1)) / 4
    fit = (c4 * c1).sum(-1) / (c1 * c1).sum(-1)
    scales = torch.where(mask, (split.scales.float() * fit).to(torch.bfloat16), split.scales)
    assert torch.equal(demoted.scales, scales)
    expected = rotation.unrotate(scales.float()[..., None] * torch.where(mask[..., None], c1, c4), 0)
    torch.testing.assert_close(demoted.decode(), expected, atol=1e-5, rtol=1e-5)
    # Demoting the demoted changes nothing; the rest keep their 4-bit reconstruction exactly.
    assert demoted.demote(mask) is demoted
    assert torch.equal(demoted.decode()[~mask], decode(encoded)[~mask])


def test_a_demoted_token_is_nearly_as_good_as_a_fresh_2_bit_encode():
    """Dropping the second stage costs a few percent of relative error against encoding the
    original at 2 bits (which demotion cannot: the original is gone)."""
    states, encoded = tiered(batch=1, heads=1, tokens=4000, dim=64)
    demoted = Tiered.of(encoded).demote(torch.ones(1, 1, 4000, dtype=torch.bool)).decode()

    def error(x):
        return ((x - states).norm() / states.norm()).item()

    fresh = error(decode(encode(states, 2)))
    assert error(decode(encoded)) < 0.1 and fresh < error(demoted) < 1.07 * fresh


def dense(split):
    """What a Tiered holds, as plain tensors: its decoded vectors and its tier mask."""
    return split.decode(), split.full


@pytest.mark.parametrize("seed", range(4))
def test_tiers_equal_plain_tensors_under_random_operations(seed):
    """Gathers (eviction), joins (appends), batch indexing (beams), slices and demotions act on a
    Tiered as on its decoded tensor and mask; the bytes follow the count of full tokens."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    _, encoded = tiered(tokens=9, seed=seed)
    split = Tiered.of(encoded)
    states, full = dense(split)
    for _ in range(25):
        op = rng.choice(["take", "concat", "batch", "slice", "demote"])
        tokens = split.length
        if op == "take" and tokens > 1:
            index = torch.rand(2, 3, tokens, generator=generator).argsort(-1)[..., : tokens - 1].sort(-1).values
            split = split.take(index)
            states = states.gather(2, index[..., None].expand(-1, -1, -1, states.shape[-1]))
            full = full.gather(2, index)
        elif op == "concat":
            extra = Tiered.of(tiered(tokens=rng.randint(1, 9), seed=rng.randint(0, 99))[1])
            split = Tiered.concat([split, extra])
            states, full = torch.cat([states, extra.decode()], 2), torch.cat([full, extra.full], 2)
        elif op == "batch":
            order = torch.tensor(rng.choice([[1, 0], [0, 0], [1, 1]]))
            split = split.map(lambda t: t.index_select(0, order))
            states, full = states[order], full[order]
        elif op == "slice" and tokens > 2:
            start = rng.randint(0, tokens - 2)
            split = split.map(lambda t: t[:, :, start:])
            states, full = states[:, :, start:], full[:, :, start:]
        elif op == "demote":
            mask = torch.rand(full.shape, generator=generator) < 0.3
            before = split
            split = split.demote(mask)
            expected = before.decode()
            states = torch.where((mask & full)[..., None], split.decode(), expected)
            full = full & ~mask
        assert torch.equal(split.full, full)
        assert torch.equal(split.decode(), states)
        assert split.nbytes == split.first.nbytes + 16 * int(full.sum()) + split.packed_full.numel()


def test_tiers_read_from_a_file_are_checked():
    _, encoded = tiered(tokens=10)
    split = Tiered.of(encoded).demote(torch.arange(10).expand(2, 3, 10) % 3 == 0)
    assert Tiered.checked(split.first, split.packed_full, split.second).nbytes == split.nbytes
    beyond = split.packed_full.clone()
    beyond[..., -1] |= 0x80  # token 15 of 10
    with pytest.raises(ValueError, match="beyond the last one"):
        Tiered.checked(split.first, beyond, split.second)
    with pytest.raises(ValueError, match="one row per 4-bit token"):
        Tiered.checked(split.first, split.packed_full, split.second[1:])
    with pytest.raises(ValueError, match="tier mask must be uint8"):
        Tiered.checked(split.first, split.packed_full[..., :1], split.second)
    bad = split.second.clone()
    bad[0, :2] = 255  # index 65535: beyond the ball's 64,497 points
    with pytest.raises(ValueError, match="no codeword"):
        Tiered.checked(split.first, split.packed_full, bad)
    with pytest.raises(ValueError, match="only 4-bit E8 codes"):
        Tiered.of(encode(torch.randn(2, 8), 2))


def test_the_config_says_what_demotion_needs():
    with pytest.raises(ValueError, match=r"`full_bits_ratio` must be a number in \(0, 1\]"):
        NexusQuantConfig(full_bits_ratio=0)
    with pytest.raises(ValueError, match="neither side is 4-bit e8"):
        NexusQuantConfig(key_bits=3, value_bits=2, full_bits_ratio=0.5)
    with pytest.raises(ValueError, match="neither side is 4-bit e8"):
        NexusQuantConfig(method="scalar", full_bits_ratio=0.5)
    config = NexusQuantConfig(full_bits_ratio=0.5, layer_overrides={0: {"key_bits": 16, "value_bits": 16}})
    assert config.for_layer(0, 2).full_bits_ratio == 1.0 and config.for_layer(1, 2).full_bits_ratio == 0.5
    assert NexusQuantConfig.from_dict(config.to_dict()) == config


DEMOTE = dict(recent_window=4, block_size=4, sink_tokens=2)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(key_bits=4, value_bits=4, full_bits_ratio=0.4),
        dict(key_bits=4, value_bits=2, full_bits_ratio=0.3, keep_ratio=0.7),
    ],
)
def test_codes_at_two_tiers_attend_as_the_reference_path(name, settings):
    """Decode steps read the tiers in the rotated domain; the reference path decodes them: the
    same logits (beams reordered, left padding)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = prompt(batch=2, length=48)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits, fast, _ = decode_both(model, NexusQuantConfig(**settings, **DEMOTE), ids, mask, steps=8, beams=True)
    check_equal(logits)
    assert any(not bool(layer.key_stream.old.full.all()) for layer in fast.layers if layer.demotes)


@pytest.mark.parametrize("scorer", ["snapkv", "h2o", "keynorm"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.6])
def test_a_layer_holds_its_budget_at_4_bits_through_a_long_decode(scorer, keep_ratio, monkeypatch):
    """Exactly ``full_bits_budget`` tokens (less the window) stay at 4 bits after every settle,
    in keys and values alike: tokens already demoted take no place among them (they rank last),
    and the sinks are never demoted."""
    monkeypatch.setattr(pages, "PAGE_TOKENS", 3)
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(
        key_bits=4, value_bits=4, full_bits_ratio=0.3, keep_ratio=keep_ratio, scorer=scorer, **DEMOTE
    )
    cache = NexusQuantCache(config, model=model)
    ids = prompt(batch=2, length=30)
    tokens = torch.randint(3, 97, (2, 60), generator=torch.Generator().manual_seed(2))
    checked = old_length = 0
    with torch.no_grad():
        model(ids, cache=cache)
        for step in range(tokens.shape[1]):
            model(tokens[:, step : step + 1], cache=cache)
            layer = cache.layers[1]
            layer.settle()
            keys, values = layer.key_stream, layer.value_stream
            if keys.old_length == old_length:
                continue  # nothing left the window: nothing is demoted
            old_length = keys.old_length
            above = keys.above_2_bits()
            assert torch.equal(above, values.above_2_bits())
            allowed = max(config.full_bits_budget(layer.seen) - keys.recent.shape[-2], config.sink_tokens)
            assert (above.sum(-1) == min(allowed, keys.old_length)).all(), step
            positions = layer._stored_positions(0, keys.old_length).expand_as(above)
            assert above[(positions >= 0) & (positions < config.sink_tokens)].all()
            checked += 1
    assert checked >= 10
    assert cache.stats()["bytes"]["total"] == held_storage(cache)


def test_a_short_prompt_never_demotes_its_sinks():
    """The budget less the window can be below the sink count early on: the sinks stay at 4 bits."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=2, full_bits_ratio=0.1, recent_window=8, block_size=4)
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(batch=1, length=20), cache=cache)
    cache.stats()
    for layer in cache.layers:
        above = layer.key_stream.above_2_bits()[0, 0]
        assert above[: config.sink_tokens].all() and not above[config.sink_tokens :].any()


def test_left_padding_is_demoted_first():
    """Padding sits below position 0 (a shift per row); it ranks last, whatever its key norm."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=4, full_bits_ratio=0.5, scorer="keynorm", **DEMOTE)
    cache = NexusQuantCache(config, model=model)
    ids = prompt(batch=2, length=40)
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
    cache.stats()
    for layer in cache.layers:
        above = layer.key_stream.above_2_bits()
        assert not above[1, :, :12].any() and above[0, :, :12].any()


def test_a_demoting_cache_saves_and_loads_and_refuses_a_config_that_does_not_match(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=2, full_bits_ratio=0.4, **DEMOTE)
    cache = NexusQuantCache(config, model=model)
    ids = prompt(batch=2, length=40)
    with torch.no_grad():
        model(ids, cache=cache)
    cache.save(tmp_path / "c.nqc", prompt_ids=ids)
    loaded = NexusQuantCache.load(tmp_path / "c.nqc", model=model, prompt_ids=ids)
    assert loaded.stats()["bytes"] == cache.stats()["bytes"]
    for saved, back in zip(cache.layers, loaded.layers):
        assert torch.equal(saved.key_stream.old_states(), back.key_stream.old_states())
        assert torch.equal(saved.key_stream.old.full, back.key_stream.old.full)
    tensors, state = cache.layers[0].state_tensors()
    plain = NexusQuantLayer(NexusQuantConfig(key_bits=4, value_bits=2, **DEMOTE))
    with pytest.raises(ValueError, match="holds tiered codes but the config does not demote"):
        plain.restore(tensors, state)


def test_one_prefill_demotes_exactly_the_lowest_ranked():
    """After a single settle the 4-bit tokens are the sinks and the best-ranked others (keynorm:
    scores fixed when recorded)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=4, full_bits_ratio=0.3, scorer="keynorm", **DEMOTE)
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(batch=2, length=60), cache=cache)
    for layer in cache.layers:
        layer.settle()
        full = layer.key_stream.old.full
        old_length = full.shape[-1]
        ranked = layer._stored_positions(0, old_length).expand_as(full) >= config.sink_tokens
        scores = layer.scores[..., :old_length].float()
        assert (~full).any()
        lowest_full = scores.masked_fill(~full | ~ranked, float("inf")).amin(-1)
        assert (scores.masked_fill(full, float("-inf")).amax(-1) <= lowest_full).all()


def test_a_tiered_cache_that_demotes_nothing_equals_the_plain_cache():
    """With a budget the prompt never exceeds, a tiered cache holds every token at 4 bits and
    serves exactly what the plain 4-bit cache serves (decode path: bit for bit)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(batch=2, length=30)
    plain = NexusQuantConfig(key_bits=4, value_bits=4, **DEMOTE)
    tiered_config = NexusQuantConfig(key_bits=4, value_bits=4, full_bits_ratio=0.999, **DEMOTE)
    results = []
    for config in (plain, tiered_config):
        cache = NexusQuantCache(config, model=model)
        for layer in cache.layers:
            layer.route = None  # the reference path: old tokens decoded, then SDPA
        out = model.generate(
            ids, cache=cache, max_new_tokens=6, do_sample=False, output_scores=True,
            return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        results.append((out.sequences, torch.stack(out.scores), cache))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    tiered_cache = results[1][2]
    assert all(layer.key_stream.old.full.all() for layer in tiered_cache.layers)
    # the same codes, split: one bit per token more
    plain_bytes, tiered_bytes = results[0][2].stats()["bytes"], tiered_cache.stats()["bytes"]
    assert plain_bytes["codes"] == tiered_bytes["codes"] and plain_bytes["scales"] == tiered_bytes["scales"]


def test_a_layer_kept_at_16_bits_is_not_tiered():
    model = tiny_llama().eval()
    config = NexusQuantConfig(full_bits_ratio=0.5, layer_overrides={0: {"key_bits": 16, "value_bits": 16}}, **DEMOTE)
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(batch=1, length=30), cache=cache)
    cache.stats()  # settles every layer
    first, second = cache.layers[0], cache.layers[1]
    assert not first.demotes and first.scores is None and isinstance(first.key_stream.old, torch.Tensor)
    assert second.demotes and not second.key_stream.old.full.all()


@pytest.mark.parametrize("split", ["head", "layer"])
def test_a_layer_split_gives_4_bits_to_the_heads_whose_attention_is_spread(split):
    """``full_bits_split="layer"`` keeps the layer's top (head, token) pairs by attention mass:
    a head that attends to few tokens gives its share to one that attends to many, the sinks stay
    at 4 bits, and the count at 4 bits, so the bytes, are those planned (the same as ``"head"``)."""
    config = NexusQuantConfig(
        key_bits=4, value_bits=2, full_bits_ratio=0.5, recent_window=8, block_size=4, sink_tokens=2,
        scorer="keynorm", full_bits_split=split,
    )  # fmt: skip
    layer = NexusQuantLayer(config)
    keys, values = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    layer.update(keys, values)
    scores = torch.zeros(1, 3, 40)
    scores[0, 0, 10:13] = 1.0  # concentrated: three tokens take all the mass
    scores[0, 1] = torch.linspace(0.02, 0.04, 40)  # spread over every token
    scores[0, 2, 20:30] = 0.1  # in between
    layer.scores = scores.half()  # attention masses as an attention scorer sums them
    layer.settle()
    above = layer.key_stream.above_2_bits()
    allowed = config.full_bits_budget(40) - 8  # 12 per head, the window aside
    counts = above.sum(-1)[0].tolist()
    assert sum(counts) == 3 * allowed
    assert above[..., :2].all()  # the sinks
    if split == "head":
        assert counts == [allowed] * 3
    else:
        assert counts[0] == 2 + 3 and counts[0] < counts[2] < counts[1]
        assert above[0, 0, 10:13].all() and above[0, 2, 20:30].all()
    assert sum(layer.nbytes().values()) == layer.planned_nbytes(40, 40)
