"""One model shared by threads, requests, copies and blocks: nothing outlives its use, nothing is silent."""

import copy
import gc
import pickle
import sys
import threading

import pytest
import torch
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, nexusquant_evict
from tests.tiny_models import greedy, prompt, tiny_llama

EVICT = dict(keep_ratio=0.5, recent_window=8, block_size=4, sink_tokens=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_llama().eval()


def generated_cache(model):
    return greedy(model, prompt(), max_new_tokens=2).cache


def test_blocks_that_close_out_of_order_restore_the_model(model):
    state = (dict(vars(model)), model.config._attn_implementation)
    first = nexusquant_evict(model, key_bits=2, **EVICT)
    second = nexusquant_evict(model, key_bits=3, **EVICT)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # not the innermost: the other block goes on
    assert generated_cache(model).config.key_bits == 3
    second.__exit__(None, None, None)
    assert type(generated_cache(model)) is DynamicCache
    assert (dict(vars(model)), model.config._attn_implementation) == state


def test_a_block_applies_only_to_its_own_thread(model):
    state = (dict(vars(model)), model.config._attn_implementation)
    entered, leave, seen = threading.Event(), threading.Event(), {}

    def request():
        with nexusquant_evict(model, key_bits=2, **EVICT):
            entered.set()
            seen["inside"] = type(generated_cache(model))
            leave.wait(30)

    worker = threading.Thread(target=request)
    worker.start()
    entered.wait(30)
    assert type(generated_cache(model)) is DynamicCache  # this thread opened no block
    with nexusquant_evict(model, key_bits=3, **EVICT):
        leave.set()
        worker.join(30)  # the other block closes first, this one is still open
        assert generated_cache(model).config.key_bits == 3
    assert seen["inside"] is NexusQuantCache
    assert type(generated_cache(model)) is DynamicCache
    assert (dict(vars(model)), model.config._attn_implementation) == state


def test_caches_built_and_dropped_on_many_threads_restore_the_attention(model):
    before = model.config._attn_implementation
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def churn():
            for _ in range(30):
                cache = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
                del cache

        workers = [threading.Thread(target=churn) for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    gc.collect()
    assert model.config._attn_implementation == before


@torch.no_grad()
def test_a_copied_cache_keeps_scoring_with_the_queries_after_the_original_is_gone(model):
    ids = prompt(length=40)
    original = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    model(ids[:, :32], cache=original)
    kept = copy.deepcopy(original)  # the original alive: the reference
    orphan = copy.deepcopy(original)
    del original
    gc.collect()
    assert model.config._attn_implementation == "nexusquant"  # the copies still need it
    expected = model(ids[:, 32:], cache=kept).logits
    torch.testing.assert_close(model(ids[:, 32:], cache=orphan).logits, expected, atol=0, rtol=0)
    for mine, theirs in zip(orphan.layers, kept.layers):
        assert mine.scores.abs().sum() > 0 and torch.equal(mine.scores, theirs.scores)
    del kept, orphan
    gc.collect()
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_an_unpickled_cache_says_it_scores_by_key_norm(model):
    cache = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    model(prompt(length=32), cache=cache)
    cache.stats()  # settles: old tokens encoded, the rest in the window
    with pytest.warns(UserWarning, match="an unpickled cache has no model, so scorer 'snapkv' falls back to 'keynorm'"):
        thawed = pickle.loads(pickle.dumps(cache))
    for layer in thawed.layers:
        stream = layer.key_stream
        keys = torch.cat([stream.old_states().float(), stream.recent.float()], -2)
        assert layer.scorer == "keynorm" and torch.equal(layer.scores, (-keys.norm(dim=-1)).half())


def test_a_users_own_attention_switch_is_not_undone(model):
    cache = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    model.set_attn_implementation("eager")  # the user's choice, while the cache lives
    del cache
    gc.collect()
    assert model.config._attn_implementation == "eager"


def test_a_shallow_copy_is_refused_rather_than_sharing_layers(model):
    cache = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    with pytest.raises(TypeError, match="cannot be shallow-copied: .* use copy.deepcopy"):
        copy.copy(cache)
    assert all(layer.scorer == "snapkv" and layer.sees_queries for layer in cache.layers)


@torch.no_grad()
def test_caches_notice_when_the_user_switches_the_attention_away(model):
    first = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    model(prompt(length=20), cache=first)
    model.set_attn_implementation("eager")  # the user's choice while the first cache lives
    with pytest.warns(UserWarning, match="scoring with 'keynorm'"):
        second = NexusQuantCache(NexusQuantConfig(**EVICT), model=model)
    assert second.scorer == "keynorm" and model.config._attn_implementation == "eager"
    with pytest.warns(UserWarning, match="stopped handing its queries to the cache"):
        model(prompt(length=4, seed=2), cache=first)
        model(prompt(length=1, seed=3), cache=first)  # a layer's miss shows at the next layer's update
    assert all(layer.scorer == "keynorm" for layer in first.layers)


def test_a_task_started_inside_a_block_does_not_keep_it_after_it_closes(model):
    import asyncio

    async def main():
        with nexusquant_evict(model, key_bits=2, **EVICT):
            started = asyncio.Event()

            async def later():
                started.set()
                await asyncio.sleep(0.05)  # the block closes meanwhile
                return type(generated_cache(model))

            task = asyncio.create_task(later())  # copies the context: the block is in it
            await started.wait()
        with nexusquant_evict(model, key_bits=3, **EVICT):  # another block keeps generate patched
            return await task

    assert asyncio.run(main()) is DynamicCache


def test_nexusquant_evict_says_what_it_takes(model):
    with pytest.raises(TypeError, match=r"`config` must be a NexusQuantConfig .* or a dict of its fields, not str"):
        with nexusquant_evict(model, "max"):
            pass
    with pytest.raises(TypeError, match="`model` must be a transformers model with `generate`, not NoneType"):
        with nexusquant_evict(None, NexusQuantConfig()):
            pass
    with nexusquant_evict(model, {"key_bits": 2, "value_bits": 2}):
        assert generated_cache(model).config.key_bits == 2
