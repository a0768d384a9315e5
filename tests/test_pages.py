"""Paged storage: equal to one contiguous tensor under any sequence of appends, evictions and
batch ops; an append moves nothing but the last page; a cache gives the same outputs whatever the page size."""

import random

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, encode, pages
from nexusquant_cache.attention import Scratch
from nexusquant_cache.codec import Encoded, decode_units
from nexusquant_cache.pages import Pages, concat, take
from tests.tiny_models import MODELS, prompt


def rows(kind: str, batch: int, count: int, generator: torch.Generator):
    states = torch.randn(batch, 2, count, 16, generator=generator)
    return encode(states, 4) if kind == "codes" else states


def assert_same(paged: Pages, reference):
    for got, expected in zip(tensors_of(paged.whole()), tensors_of(reference), strict=True):
        assert torch.equal(got, expected)
    sizes = [pages.length(page) for page in paged.pages]
    assert paged.length == sum(sizes) == pages.length(reference)
    assert all(size == paged.size for size in sizes[:-1]) and 1 <= sizes[-1] <= paged.size


def tensors_of(page):
    return (page.codes, page.scales) if isinstance(page, Encoded) else (page,)


@pytest.mark.parametrize("kind", ["codes", "states"])
@pytest.mark.parametrize("size", [1, 3, 8])
def test_pages_equal_one_tensor_under_random_operations(kind, size):
    generator = torch.Generator().manual_seed(size)
    chooser = random.Random(size)
    paged, reference, batch = Pages(size), None, 2
    for _ in range(60):
        operation = chooser.choice(["append", "append", "append", "evict", "beams", "repeat", "select"])
        if operation == "append":
            block = rows(kind, batch, chooser.randint(1, 7), generator)
            before = list(paged.pages[:-1])
            paged.append(block)
            reference = concat([reference, block])
            # Settling a block moves nothing before the last page: O(page + block), not O(context).
            assert all(a is b for a, b in zip(before, paged.pages, strict=False))
        elif reference is None:
            continue
        elif operation == "evict":
            total = pages.length(reference)
            kept = chooser.randint(1, total)
            keep = torch.rand(batch, 2, total, generator=generator).argsort(-1)[..., :kept].sort(-1).values
            paged, reference = Pages.of(take(paged.whole(), keep), size), take(reference, keep)
        else:
            if operation == "beams":
                fn = lambda t: t.index_select(0, torch.arange(t.shape[0]).flip(0))  # noqa: E731
            elif operation == "repeat" and batch < 4:
                fn = lambda t: t.repeat_interleave(2, dim=0)  # noqa: E731
            else:
                fn = lambda t: t[torch.arange(t.shape[0]) != 1]  # noqa: E731 -- drops row 1 (if any)
            paged.map(fn)
            reference = pages._map(reference, fn)
            batch = (reference.scales if kind == "codes" else reference).shape[0]
        assert_same(paged, reference)


@pytest.mark.parametrize("method, bits", [("e8", 2), ("e8", 3), ("e8", 4), ("scalar", 4)])
def test_codes_read_as_pages_equal_the_codes_read_whole(method, bits):
    states = torch.randn(2, 3, 11, 16, generator=torch.Generator().manual_seed(bits))
    whole = encode(states, bits, method)
    paged = Pages.of(whole, 4)
    assert len(paged.pages) == 3
    units, factor, bias = decode_units(paged.pages)
    expected_units, expected_factor, expected_bias = decode_units(whole)
    assert torch.equal(units, expected_units) and torch.equal(factor, expected_factor) and bias == expected_bias
    with pytest.raises(ValueError, match="share bits, method and seed"):
        decode_units([whole, encode(states, 2 if bits != 2 else 4, method)])


CONFIGS = {
    "K4V2": dict(key_bits=4, value_bits=2),
    "K16V16 snapkv merge": dict(key_bits=16, value_bits=16, keep_ratio=0.5, merge="values", sink_tokens=2),
    "K4V2 merge bias": dict(
        key_bits=4, value_bits=2, keep_ratio=0.5, merge="keys_values", merge_bias=True, sink_tokens=2
    ),
    "K4V4 h2o": dict(key_bits=4, value_bits=4, keep_ratio=0.6, scorer="h2o", sink_tokens=2),
    "K4V2 demote": dict(key_bits=4, value_bits=2, full_bits_ratio=0.4, sink_tokens=2),
    "K4V4 demote evict": dict(key_bits=4, value_bits=4, keep_ratio=0.7, full_bits_ratio=0.4, sink_tokens=2),
    "K4V2 demote 8-bit scales": dict(key_bits=4, value_bits=2, full_bits_ratio=0.4, scale_bits=8, sink_tokens=2),
}


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("settings", list(CONFIGS))
def test_a_cache_is_the_same_whatever_the_page_size(name, settings, monkeypatch):
    """Pages of 3 tokens (many pages, a partly filled last one) against pages larger than the
    context (one contiguous tensor, as storage was before pages): the same tokens, scores and
    stored bytes, through a prefill, beam search (reorder every step) and sampling-free decode."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    config = NexusQuantConfig(**CONFIGS[settings], recent_window=8, block_size=4)
    ids = prompt(batch=2, length=40)
    results = []
    for page_tokens in (3, 4096):
        monkeypatch.setattr(pages, "PAGE_TOKENS", page_tokens)
        cache = NexusQuantCache(config, model=model)
        out = model.generate(
            ids, cache=cache, max_new_tokens=10, num_beams=2, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        if page_tokens == 3:
            assert len(cache.layers[0].value_stream.pages.pages) > 1
        held = dict(cache.stats()["bytes"])
        masks = sum(mask_bytes(layer) for layer in cache.layers)
        held["metadata"], held["total"] = held["metadata"] - masks, held["total"] - masks
        results.append((out.sequences, torch.stack(out.scores), held))
    (tokens, scores, held), (tokens_one, scores_one, held_one) = results
    assert torch.equal(tokens, tokens_one) and torch.equal(scores, scores_one) and held == held_one


def mask_bytes(layer):
    """Bytes of a layer's tier masks: each page packs its own, a byte per 8 tokens or fewer (so
    small pages hold a little more), and nothing else depends on the page size."""
    total = 0
    for stream in (layer.key_stream, layer.value_stream):
        for page in stream.pages.pages if stream.tiered and stream._holds_codes() else ():
            assert page.packed_full.shape[-1] == -(-page.length // 8)
            total += page.packed_full.numel()
    return total


def test_a_16_bit_side_in_one_page_is_read_in_place():
    torch.manual_seed(0)
    model = MODELS["llama"]().eval()
    cache = NexusQuantCache(NexusQuantConfig(key_bits=16, value_bits=4, recent_window=8, block_size=4), model=model)
    with torch.no_grad():
        model(prompt(batch=1, length=60), cache=cache)
    cache.stats()
    stream = cache.layers[0].key_stream
    (page,) = stream.pages.pages
    assert stream.old_for_attention(Scratch(), "keys").data_ptr() == page.data_ptr()  # no copy per step


def test_a_widened_window_widens_every_page(monkeypatch):
    """A guarded side holds float16 pages for a float32 model until a key beyond float16's range
    widens the window: then every page takes float32, as one tensor would, so the bytes held do not
    depend on the page size, and they survive save and load."""
    from tests.test_conditioning import GUARD, PROMPT, biased_llama

    held = []
    for page_tokens in (4, 1 << 16):
        monkeypatch.setattr(pages, "PAGE_TOKENS", page_tokens)
        model = biased_llama()
        cache = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=False), model=model)
        with pytest.warns(UserWarning, match="full precision"), torch.no_grad():
            model(PROMPT, cache=cache)
            cache.stats()
        assert cache.layers[0].key_stream.guarded
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.mul_(500.0)  # keys near 1e5: beyond float16
            model(PROMPT[:, :16], cache=cache)
        cache.stats()  # settles: the widened window's block retires into the pages
        stream = cache.layers[0].key_stream
        assert {page.dtype for page in stream.pages.pages} == {torch.float32}
        assert len(stream.pages.pages) > (1 if page_tokens == 4 else 0)
        held.append(cache.stats()["bytes"])
    assert held[0] == held[1]


def test_eviction_keeps_the_page_size(monkeypatch):
    monkeypatch.setattr(pages, "PAGE_TOKENS", 3)
    model = MODELS["llama"]().eval()
    config = NexusQuantConfig(key_bits=4, value_bits=4, keep_ratio=0.5, recent_window=8, block_size=4)
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(batch=1, length=20), cache=cache)
        cache.stats()
        stream = cache.layers[0].key_stream
        stream.pages = Pages.of(stream.pages.whole(), 5)  # a stream set to another size keeps it
        for step in range(12):  # decode steps: blocks retire and the layer evicts
            model(prompt(batch=1, length=1, seed=step), cache=cache)
        cache.stats()
    assert stream.pages.size == 5 and cache.get_seq_length() == 32 and stream.old_length < 24
