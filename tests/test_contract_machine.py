"""The cache's contract under random use: a hypothesis state machine drives prefills, decode
steps, chunked prefills, beam reorders, save/load and deep copies on random tiny architectures
and configs, and after every step checks the invariants:

- 16-bit storage without eviction equals DynamicCache exactly;
- eviction at 16 bits equals a DynamicCache holding only the tokens kept (the masked reference);
- a cache that was saved and loaded, or copied, continues exactly as a twin that never was;
- ``stats()`` counts exactly the storage alive;
- once no cache uses the model, its attention implementation is its own again at once.
"""

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from tests.tiny_models import MODELS, held_storage

BATCH = 2
CONFIGS = {
    "16-bit": NexusQuantConfig(key_bits=16, value_bits=16),
    "evict keynorm": NexusQuantConfig(
        key_bits=16, value_bits=16, keep_ratio=0.5, recent_window=4, block_size=2, sink_tokens=1, scorer="keynorm"
    ),
    "evict snapkv": NexusQuantConfig(key_bits=16, value_bits=16, keep_ratio=0.5, recent_window=4, block_size=2),
    "K4V2": NexusQuantConfig(key_bits=4, value_bits=2, recent_window=4, block_size=2),
    "K3V3 evict": NexusQuantConfig(key_bits=3, value_bits=3, keep_ratio=0.6, recent_window=4, block_size=3),
    "K4V4 demote evict": NexusQuantConfig(
        key_bits=4, value_bits=4, keep_ratio=0.6, full_bits_ratio=0.3, recent_window=4, block_size=2
    ),
    "evict to a byte budget": NexusQuantConfig(
        key_bits=16, value_bits=16, target_ratio=1.6, recent_window=4, block_size=2
    ),
    "K4V2 byte budget": NexusQuantConfig(key_bits=4, value_bits=2, target_ratio=6, recent_window=4, block_size=2),
}
_MODELS = {}


def model_for(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = MODELS[name]().eval()
    return _MODELS[name]


def prune_to(reference, positions, cache):
    """Drop from the DynamicCache ``reference`` (its tokens' positions per full-attention layer in
    ``positions``) every token ``cache`` evicted: then both hold the same tokens, to the bit."""
    for index, layer in enumerate(cache.layers):
        if layer.is_sliding or layer.positions is None:
            continue  # sliding layers keep their window (the reference's does the same)
        layer.settle()
        kept = layer.positions.long()
        where = torch.searchsorted(
            positions[index].contiguous(), kept.contiguous()
        )  # kept positions are a subset, both ascending
        held = reference.layers[index]
        take = where[..., None].expand(*where.shape, held.keys.shape[-1])
        held.keys, held.values = held.keys.gather(2, take), held.values.gather(2, take)
        positions[index] = kept


class CacheContract(RuleBasedStateMachine):
    @initialize(architecture=st.sampled_from(sorted(MODELS)), config=st.sampled_from(sorted(CONFIGS)))
    def build(self, architecture, config):
        self.model = model_for(architecture)
        self.attention = self.model.config._attn_implementation
        self.config = CONFIGS[config]
        self.cache = NexusQuantCache(self.config, model=self.model)
        self.twin = NexusQuantCache(self.config, model=self.model)  # never saved nor copied
        # At 16 bits: DynamicCache, pruned to the tokens ours kept before every forward when evicting.
        self.dynamic = DynamicCache(config=self.model.config) if not self.config.compresses else None
        self.dynamic_positions = {}
        self.ids = torch.zeros(BATCH, 0, dtype=torch.long)
        self.folder = tempfile.TemporaryDirectory()

    @rule(length=st.integers(1, 7), seed=st.integers(0, 2**16))
    def forward(self, length, seed):
        """A prefill chunk (or a decode step, at length 1), through every cache at once."""
        step = torch.randint(3, 97, (BATCH, length), generator=torch.Generator().manual_seed(seed))
        positions = torch.arange(self.ids.shape[1], self.ids.shape[1] + length)[None].expand(BATCH, -1)
        if self.dynamic is not None and self.config.evicts and self.ids.shape[1]:
            prune_to(self.dynamic, self.dynamic_positions, self.cache)
        with torch.no_grad():
            ours = self.model(step, cache=self.cache, position_ids=positions).logits
            twins = self.model(step, cache=self.twin, position_ids=positions).logits
            assert torch.equal(ours, twins)
            if self.dynamic is not None:
                expected = self.model(step, cache=self.dynamic, position_ids=positions).logits
                if self.config.evicts:  # the same tokens, in a mask of another length
                    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
                else:
                    assert torch.equal(ours, expected)
        if self.dynamic is not None and self.config.evicts:
            for index, layer in enumerate(self.dynamic.layers):
                new = positions[:, None].expand(-1, layer.keys.shape[1], -1)
                held = self.dynamic_positions.get(index)
                self.dynamic_positions[index] = new if held is None else torch.cat([held, new], -1)
        self.ids = torch.cat([self.ids, step], dim=1)

    @precondition(lambda self: self.ids.shape[1] > 0)
    @rule(order=st.permutations(range(BATCH)))
    def reorder(self, order):
        """Beam search's reorder: every cache and the history follow the same rows."""
        beams = torch.tensor(order)
        for cache in (self.cache, self.twin, self.dynamic):
            if cache is not None:
                cache.reorder_cache(beams)
        self.dynamic_positions = {index: held[beams] for index, held in self.dynamic_positions.items()}
        self.ids = self.ids[beams]

    @precondition(lambda self: self.ids.shape[1] > 0)
    @rule()
    def save_and_load(self):
        path = Path(self.folder.name) / "c.nqc"
        self.cache.save(path)
        self.cache = NexusQuantCache.load(path, model=self.model)
        for layer in self.twin.layers:  # a loaded cache checks the attention hand-off again: the
            layer._route_confirmed = False  # twin takes its one reference step per layer too

    @precondition(lambda self: self.ids.shape[1] > 0)
    @rule()
    def deep_copy(self):
        self.cache = copy.deepcopy(self.cache)  # the original is dropped: the copy must stand alone

    @invariant()
    def stats_count_the_storage_alive(self):
        if self.ids.shape[1]:
            assert self.cache.stats()["bytes"]["total"] == held_storage(self.cache)

    def teardown(self):
        self.cache = self.twin = self.dynamic = None  # no reference cycles: nothing waits for a GC pass
        assert self.model.config._attn_implementation == self.attention
        self.folder.cleanup()


CacheContract.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=6,
    deadline=None,
    derandomize=True,  # the same sequences on every run: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_cache_contract = CacheContract.TestCase
