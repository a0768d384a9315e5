"""Qwen2.5-Coder-0.5B (biased key projections: large, RoPE-rotated key offsets) on Python source."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval import builtin_texts

from .real_models import check_target_ratio, mean_kl, teacher_forced

pytestmark = pytest.mark.real_model

PREFIX, CONTINUATION = 768, 128


@pytest.fixture(scope="module")
def qwen():
    from nexusquant_cache.models import load_qwen25_coder

    model, tokenizer = load_qwen25_coder()
    text = builtin_texts("python-code")[0][1][20_000:60_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : PREFIX + CONTINUATION]
    return model, ids


def score(model, ids, cache):
    return teacher_forced(model, ids, cache, PREFIX)


def test_keys_are_conditioned_automatically(qwen):
    model, ids = qwen
    reference = score(model, ids, DynamicCache(config=model.config))
    kls, guarded = {}, {}
    for name, center in (("auto", None), ("off", False)):
        config = NexusQuantConfig.preset("lossless", center_keys=center)  # K4V4
        cache = NexusQuantCache(config, model=model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logprobs = score(model, ids, cache)
        assert any("distort" in str(w.message) for w in caught) == (center is False)  # the guard says so
        kls[name] = mean_kl(reference, logprobs)
        torch.testing.assert_close(logprobs[:, 0], reference[:, 0], atol=1e-4, rtol=0)  # prefill untouched
        guarded[name] = cache.stats()["guarded_layers"]
    print(f"K4V4 KL: {kls}, guarded layers: {guarded}")
    # Before conditioning, 4-bit keys gave this model +143% perplexity (KL ~1). Measured here:
    # KL 0.004 with nothing guarded; without conditioning the guard keeps a few layers' keys exact.
    assert kls["auto"] < 0.015 and guarded["auto"] == []
    assert guarded["off"] and kls["off"] < 0.1


def test_target_ratio_meets_its_byte_budget(qwen):
    model, ids = qwen
    check_target_ratio(model, ids[:, :PREFIX], 8)
