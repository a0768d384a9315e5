"""``target_ratio``: one byte budget for the whole cache (allocation.py)."""

import copy
import math
import warnings

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from tests.tiny_models import prompt, tiny_gemma3, tiny_llama

WINDOW = dict(recent_window=16, block_size=16)
# name: (settings, targets): each target below what the codes alone reach (so tokens are evicted)
CONFIGS = {
    "K4V2": (dict(key_bits=4, value_bits=2), (4.5, 7.5)),
    "K4V4 demote": (dict(key_bits=4, value_bits=4, full_bits_ratio=0.5), (4.5, 7.5)),
    "K2V2 h2o": (dict(key_bits=2, value_bits=2, scorer="h2o"), (7.5, 9.0)),
    "exact first layer": (dict(key_bits=4, value_bits=4, layer_overrides={0: {"key_bits": 16}}), (3.0, 6.0)),
    "streaming": (dict(key_bits=3, value_bits=2, scorer="streaming"), (6.0, 9.0)),
    "K4V2 merge bias": (dict(key_bits=4, value_bits=2, merge="keys_values", merge_bias=True), (4.5, 7.5)),
    "K4V4 demote 8-bit scales": (dict(key_bits=4, value_bits=4, full_bits_ratio=0.5, scale_bits=8), (4.5, 7.5)),
}


def padded_prompt(length=300, pads=5):
    ids = prompt(2, length)
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    return ids, mask


def planned(cache, stored=None):
    """Bytes every layer plans to hold at the tokens seen, keeping ``stored`` (default: as held)."""
    seen = cache.get_seq_length()
    return sum(layer.planned_nbytes(seen, stored or layer.key_stream.length) for layer in cache.layers)


def check_budget_met(cache, target):
    """Right after a block was encoded: the plan is what is held, and the tokens kept are the
    most whose bytes fit 1/target of the 16-bit cache (or the floor, when none fit)."""
    stats = cache.stats()
    assert stats["bytes"]["total"] == planned(cache)
    allowed = stats["baseline_bytes"] / target
    stored = stats["tokens_stored"]
    assert planned(cache, stored + 1) > allowed
    if stored > cache.config.budget_floor:
        assert stats["bytes"]["total"] <= allowed
        assert stats["ratio"] == pytest.approx(target, rel=0.02)
    return stats


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("which", [0, 1])
def test_every_encoded_block_meets_the_byte_budget(name, which):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    settings, targets = CONFIGS[name]
    target = targets[which]
    config = NexusQuantConfig(**settings, **WINDOW, target_ratio=target)
    cache = NexusQuantCache(config, model=model)
    ids, mask = padded_prompt()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache)
        stats = check_budget_met(cache, target)
        # it evicted to get there, and kept more than the floor (so the 2% check ran)
        assert config.budget_floor < stats["tokens_stored"] < stats["tokens_seen"]
        checked = 0
        for _ in range(40):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, cache=cache)
            cache.stats()  # settles
            if cache.layers[0].key_stream.recent.shape[-2] == config.recent_window:  # a block just left
                check_budget_met(cache, target)
                checked += 1
    assert checked == 2


@pytest.mark.parametrize("window", [WINDOW, dict(recent_window=8, block_size=8)])
def test_sliding_layers_are_counted_and_a_target_out_of_reach_keeps_the_floor(window):
    torch.manual_seed(0)
    model = tiny_gemma3().eval()
    # Its sliding layers hold 15 tokens, fewer than a window and a block, so they never encode
    # (also at an 8-token window): the whole cache cannot reach 3x, and the full-attention
    # layers keep only what they always hold.
    config = NexusQuantConfig(key_bits=4, value_bits=2, **window, target_ratio=3)
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(2, 300), cache=cache)
        with pytest.warns(UserWarning, match="target_ratio 3 cannot be met at 300 tokens") as said:
            stats = cache.stats()
        model(prompt(2, 100), cache=cache)
        cache.stats()
    assert len(said) == 1  # said once per cache
    assert stats["tokens_stored"] == config.budget_floor
    assert stats["bytes"]["total"] == planned(cache) > stats["baseline_bytes"] / 3
    # within reach, the sliding layers' bytes are paid for by the full-attention layers
    reachable = NexusQuantCache(config.__class__(**{**config.to_dict(), "target_ratio": 1.5}), model=model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="NexusQuantCache: target_ratio")  # within reach: nothing to say
        model(prompt(2, 300), cache=reachable)
        assert check_budget_met(reachable, 1.5)["tokens_stored"] > config.budget_floor


def test_a_target_the_codes_already_reach_evicts_nothing():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(2, 120)
    outputs = []
    for target in (None, 1.5):
        cache = NexusQuantCache(NexusQuantConfig(**WINDOW, target_ratio=target), model=model)
        with torch.no_grad():
            outputs.append(model(ids, cache=cache).logits)
            outputs.append(model(ids[:, :1], cache=cache).logits)
        assert cache.stats()["tokens_stored"] == 121
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])


def test_copies_and_files_keep_the_budget(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=2, **WINDOW, target_ratio=6)
    cache = NexusQuantCache(config, model=model)
    ids = prompt(1, 300)
    with torch.no_grad():
        model(ids, cache=cache)
    cache.save(tmp_path / "c.nqc")
    caches = [cache, copy.deepcopy(cache), NexusQuantCache.load(tmp_path / "c.nqc", model=model)]
    assert caches[2].config.target_ratio == 6.0
    steps = []
    for each in caches:
        budget = each.layers[0].byte_budget
        assert (
            budget is not None and budget.cache() is each and all(layer.byte_budget is budget for layer in each.layers)
        )
        logits, token = [], ids[:, -1:]
        with torch.no_grad():
            for _ in range(20):
                out = model(token, cache=each)
                token = out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        steps.append((torch.cat(logits), each.stats()["tokens_stored"]))
    for logits, stored in steps[1:]:
        assert torch.equal(logits, steps[0][0]) and stored == steps[0][1]


def test_a_reset_cache_plans_again():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=2, recent_window=8, block_size=8, target_ratio=6)
    ids, mask = padded_prompt(length=200, pads=150)  # the second run's padding changes the count
    caches = [NexusQuantCache(config, model=model), NexusQuantCache(config, model=model)]
    with torch.no_grad():
        model(prompt(1, 200), cache=caches[0])
        caches[0].stats()
        caches[0].reset()
        for cache in caches:
            model(ids, attention_mask=mask, cache=cache)
    assert caches[0].stats() == caches[1].stats()


def test_a_layer_copied_alone_plans_with_its_cache_and_says_so_when_it_is_gone():
    model = tiny_llama().eval()
    cache = NexusQuantCache(NexusQuantConfig(**WINDOW, target_ratio=6), model=model)
    with torch.no_grad():
        model(prompt(1, 100), cache=cache)
    layer = copy.deepcopy(cache.layers[0])
    assert layer.byte_budget.cache() is cache
    del cache
    with pytest.raises(RuntimeError, match="that cache is gone"):
        layer.byte_budget.tokens(200)
    assert copy.deepcopy(layer).byte_budget.cache() is None  # and copying it still works


def test_a_dropped_cache_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = tiny_llama().eval()
    gc.disable()
    try:
        cache = NexusQuantCache(NexusQuantConfig(**WINDOW, target_ratio=6), model=model)
        layer = weakref.ref(cache.layers[0])
        del cache
        assert layer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("bad", [1, 0.5, -3, math.inf, math.nan, 10**400, True, "8"])
def test_target_ratio_must_be_a_finite_number_above_1(bad):
    with pytest.raises(ValueError, match="`target_ratio` must be None or a finite number > 1"):
        NexusQuantConfig(target_ratio=bad)


def test_target_ratio_round_trips_and_counts_as_eviction():
    config = NexusQuantConfig(target_ratio=8)
    assert config.target_ratio == 8.0 and isinstance(config.target_ratio, float)
    assert config.evicts and NexusQuantConfig.from_dict(config.to_dict()) == config
