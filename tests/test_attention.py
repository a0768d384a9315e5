"""Rotated-domain attention (attention.py): decode steps that read the codes as they are must give
the logits of the reference path (decode every old token, un-rotate, SDPA), on every layout."""

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, attention
from nexusquant_cache import layer as layer_module
from nexusquant_cache.attention import Scratch, StoredKeys
from nexusquant_cache.codec import decode, decode_units, encode, unrotate
from nexusquant_cache.codec.packing import unpack_words
from nexusquant_cache.codec.quantizers import quantizer

from .test_conditioning import HEAD_DIM, tiny, tiny_gemma3, tiny_llama
from .tiny_models import tiny_gpt2


def reference_decode(encoded, dtype=None):
    """The codec's decode as it was before decode_units: float codewords, scale, un-rotate."""
    q = quantizer(encoded.method.value, encoded.bits)
    codes = encoded.codes.reshape(-1, encoded.codes.shape[-1])
    words = unpack_words(codes, encoded.bits)
    points = q.dequantize(words.reshape(-1)).view(words.shape[0], -1)
    values = unrotate(points * encoded.scales.reshape(-1, 1).float(), encoded.seed)
    return values.to(dtype or encoded.dtype).view(encoded.shape)


@pytest.mark.parametrize("method", ["e8", "scalar"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_units_is_the_rotated_reconstruction(method, bits, dtype):
    x = (torch.randn(3, 2, 37, 64) * torch.rand(3, 2, 37, 1) * 20).to(dtype)
    encoded = encode(x, bits, method, seed=5)
    assert torch.equal(decode(encoded), reference_decode(encoded))  # decode now goes through decode_units
    units, factor, bias = decode_units(encoded, dtype)
    assert units.dtype == dtype and factor.shape == encoded.scales.shape
    exact = method == "e8" and bits != 3  # small integers in every dtype (3 bits: 2 c1 + 0.28 * 2 c2)
    if exact:
        assert torch.equal(units, units.round()) and units.abs().max() < 128
    rotated = (units.float() - bias) * factor[..., None]
    expected = reference_decode(encoded, torch.float32)
    error = (unrotate(rotated, 5) - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error.max() < (1e-6 if exact or dtype == torch.float32 else 2 * torch.finfo(dtype).eps)


def qwen2():
    return tiny("Qwen2", layers=2)  # biased key projections


def biased_llama():
    return tiny_llama(attention_bias=True)


MODELS = {"llama": biased_llama, "qwen2": qwen2, "gemma3": tiny_gemma3, "gpt2": lambda: tiny_gpt2().eval()}
SMALL = dict(recent_window=8, block_size=8)
CONFIGS = {
    "K4V4": NexusQuantConfig(**SMALL),
    "K3V2": NexusQuantConfig(key_bits=3, value_bits=2, **SMALL),
    "K16V4": NexusQuantConfig(key_bits=16, **SMALL),
    "scalar": NexusQuantConfig(method="scalar", **SMALL),
    "no-conditioning": NexusQuantConfig(center_keys=False, **SMALL),
    "snapkv": NexusQuantConfig(keep_ratio=0.5, sink_tokens=2, **SMALL),
    "h2o": NexusQuantConfig(keep_ratio=0.5, scorer="h2o", value_bits=2, **SMALL),
    "8-bit scales": NexusQuantConfig(value_bits=2, scale_bits=8, keep_ratio=0.5, sink_tokens=2, **SMALL),
}


def fast_and_reference(model, config):
    """A cache that attends to codes (rotated domain) and one forced onto the reference path
    (update returns every state decoded; SDPA attends to them)."""
    fast, reference = NexusQuantCache(config, model=model), NexusQuantCache(config, model=model)
    for layer in reference.layers:
        layer.route = None
    return fast, reference


def decode_both(model, config, ids, mask, steps=6, beams=False):
    """Logits of a prefill and ``steps`` single-token forwards through a cache that attends to
    codes (rotated domain) and one forced onto the reference path, and the two caches."""
    torch.manual_seed(0)
    fast, reference = fast_and_reference(model, config)
    tokens = torch.randint(
        3, 97, (ids.shape[0] * (2 if beams else 1), steps), generator=torch.Generator().manual_seed(3)
    )
    logits = {"fast": [], "reference": []}
    with torch.no_grad():
        for name, cache in (("fast", fast), ("reference", reference)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(ids, attention_mask=mask, position_ids=positions, cache=cache)
            step_mask, last = mask, positions[:, -1:]
            if beams:
                cache.batch_repeat_interleave(2)
                step_mask, last = step_mask.repeat_interleave(2, 0), last.repeat_interleave(2, 0)
            for step in range(steps):
                if beams and step % 2:
                    order = torch.arange(step_mask.shape[0]).view(-1, 2).flip(-1).reshape(-1)
                    cache.reorder_cache(order)
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], -1)
                out = model(
                    tokens[:, step : step + 1], attention_mask=step_mask, position_ids=last + 1 + step, cache=cache
                )
                logits[name].append(out.logits.float())
    return logits, fast, reference


def check_equal(logits):
    for step, (fast, reference) in enumerate(zip(logits["fast"], logits["reference"])):
        error = (fast - reference).abs().max() / reference.abs().max()
        assert error < 1e-4, f"decode step {step}: relative logit error {error:.2e}"


@pytest.fixture
def rotated_calls(monkeypatch):
    """How many layer forwards attended in the rotated domain."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return attention.attend(*args, **kwargs)

    monkeypatch.setattr(layer_module, "attend", counted)
    return calls


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("model_name", MODELS)
def test_rotated_attention_equals_the_reference_path(model_name, config, rotated_calls):
    model = MODELS[model_name]()
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    logits, fast, reference = decode_both(model, CONFIGS[config], ids, mask)
    check_equal(logits)
    # Every decode step of every layer after the first (which checks that our attention function gets
    # update's keys as they are), only the fast cache's.
    assert len(rotated_calls) == 5 * len(fast.layers)
    assert fast.stats()["bytes"] == reference.stats()["bytes"]


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
def test_rotated_attention_follows_beams(model_name, rotated_calls):
    model = MODELS[model_name]()
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    logits, fast, _ = decode_both(model, CONFIGS["snapkv"], ids, torch.ones_like(ids), beams=True)
    check_equal(logits)
    assert len(rotated_calls) == 5 * len(fast.layers)


def test_generate_uses_the_rotated_path_and_matches_the_reference():
    model = biased_llama()
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    config = NexusQuantConfig(**SMALL)
    fast = NexusQuantCache(config, model=model)
    calls = []
    original = type(fast.layers[0]).attend
    for layer in fast.layers:
        layer.attend = lambda *args, _layer=layer, **kwargs: calls.append(1) or original(_layer, *args, **kwargs)
    reference = NexusQuantCache(config, model=model)
    for layer in reference.layers:
        layer.route = None
    runs = [
        model.generate(
            ids, max_new_tokens=8, do_sample=False, cache=cache, output_logits=True, return_dict_in_generate=True
        )
        for cache in (fast, reference)
    ]
    assert len(calls) == 6 * len(model.model.layers)  # every decode step but the first (the check)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_model_switched_off_our_attention_gets_every_state():
    """Once the hand-off is confirmed, a model switched to plain SDPA mid-life decodes as a
    cache that never attended to codes (the window alone would change its logits)."""
    model = biased_llama()
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    caches = fast_and_reference(model, NexusQuantConfig(**SMALL))
    logits = {"fast": [], "reference": []}
    with torch.no_grad():
        for name, cache in zip(logits, caches):
            model(ids, cache=cache)
            model(torch.tensor([[5]]), cache=cache)  # confirms the hand-off on the fast cache
            model.set_attn_implementation("sdpa")
            try:
                logits[name].append(model(torch.tensor([[6]]), cache=cache).logits)
            finally:
                model.set_attn_implementation("nexusquant")
    assert all(layer._route_confirmed for layer in caches[0].layers)
    check_equal(logits)


def test_scratch_grows_by_pages_and_is_reused():
    scratch = Scratch()
    first = scratch.take("keys", (2, 3, 100, 8), torch.float32, torch.device("cpu"))
    again = scratch.take("keys", (2, 3, 50, 8), torch.float32, torch.device("cpu"))
    assert first.data_ptr() == again.data_ptr()
    larger = scratch.take("keys", (2, 3, 20000, 8), torch.float32, torch.device("cpu"))
    assert (
        larger.numel() == 2 * 3 * 20000 * 8
        and scratch._buffers[("keys", torch.float32, torch.device("cpu"))].numel() % Scratch.PAGE == 0
    )


@pytest.mark.parametrize("config", ["K4V4", "snapkv"])
def test_offsets_at_positions_beyond_the_table(config, monkeypatch):
    """Positions too sparse or too far for the shared cos/sin table are turned on the spot."""
    monkeypatch.setattr(attention, "_TABLE_POSITIONS", 1)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits, _, _ = decode_both(biased_llama(), CONFIGS[config], ids, mask)
    check_equal(logits)


def step_allocations(model, config, context, rotated):
    """Bytes the ops of one decode step allocate (leaf ops, as the profiler records them)."""
    from torch.profiler import ProfilerActivity, profile

    cache = NexusQuantCache(config, model=model)
    if not rotated:
        for layer in cache.layers:
            layer.route = None
    ids = torch.randint(3, 97, (1, context), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[5]])
    with torch.no_grad():
        model(ids, cache=cache)
        for _ in range(3):  # settle the prefill, grow the scratch
            model(token, cache=cache)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            model(token, cache=cache)
    return sum(e.cpu_memory_usage for e in profiler.events() if e.cpu_memory_usage > 0 and not e.cpu_children)


def test_a_decode_step_makes_no_float_copy_of_the_history():
    """What a step allocates grows with the context by less than one float32 copy of a token's
    keys and values per layer: the lookup's small integer temporaries and the logits, not a
    reconstruction of the history (the reference path's growth is three such copies)."""
    model = biased_llama()
    config = NexusQuantConfig(**SMALL)
    layers, heads, dim = len(model.model.layers), model.config.num_key_value_heads, HEAD_DIM
    one_copy = layers * 2 * heads * dim * 4  # bytes per token: keys and values, float32
    growth = {}
    for rotated in (True, False):
        short, long = (step_allocations(model, config, n, rotated) for n in (200, 400))
        growth[rotated] = (long - short) / 200
    assert growth[True] < one_copy < growth[False] / 2, growth


def jetmoe():
    """Repeats its keys after ``cache.update``: our function does not get update's tensors."""
    import transformers

    config = transformers.JetMoeConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return transformers.JetMoeForCausalLM(config).eval()


@pytest.mark.parametrize("config", ["K4V4", "K16V4"])
def test_a_model_that_changes_its_keys_after_update_keeps_the_reference_path(config, rotated_calls):
    model = jetmoe()
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    logits, _, _ = decode_both(model, CONFIGS[config], ids, torch.ones_like(ids))
    check_equal(logits)
    assert not rotated_calls


def test_another_instance_of_the_model_gets_every_state():
    """A cache built for one model object and decoded by another (same weights, plain SDPA)."""
    torch.manual_seed(0)
    model = biased_llama()
    other = biased_llama()
    other.load_state_dict(model.state_dict())
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    caches = fast_and_reference(model, NexusQuantConfig(**SMALL))
    logits = {"fast": [], "reference": []}
    with torch.no_grad():
        for name, cache in zip(logits, caches):
            model(ids, cache=cache)
            for token in (5, 6, 7):  # the first step checks the hand-off on `model`, the others run on `other`
                runner = model if token == 5 else other
                logits[name].append(runner(torch.tensor([[token]]), cache=cache).logits)
    check_equal(logits)


def test_update_called_directly_returns_every_state():
    model = biased_llama()
    cache = NexusQuantCache(NexusQuantConfig(**SMALL), model=model)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4)), cache=cache)
        keys, values = cache.layers[0].update(torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM))
    assert keys.shape[-2] == values.shape[-2] == 31


def test_inference_mode_then_outside_and_a_tracked_step():
    """The scratch made inside inference mode serves steps outside it; a step autograd tracks
    runs the reference path (the cache's tensors from inference mode cannot be saved for backward
    otherwise) and its gradient equals a reference cache's."""
    model = biased_llama()
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    config = NexusQuantConfig(**SMALL)
    gradients = []
    for rotated in (True, False):
        cache = NexusQuantCache(config, model=model)
        if not rotated:
            for layer in cache.layers:
                layer.route = None
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=3, do_sample=False, cache=cache)
        with torch.no_grad():
            model(torch.tensor([[5]]), cache=cache)
        model.zero_grad()
        model(torch.tensor([[6]]), cache=cache).logits.square().sum().backward()
        gradients.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_are_no_less_precise_than_the_reference(dtype):
    """Against the same cache run in float32 (its codes decode the same way), the rotated path's
    logits err no more than the reference path's in the model's 16-bit dtype."""
    model = biased_llama()
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    exact, _, _ = decode_both(model, CONFIGS["K4V4"], ids, mask)
    logits, _, _ = decode_both(model.to(dtype), CONFIGS["K4V4"], ids, mask)
    for fast, reference, truth in zip(logits["fast"], logits["reference"], exact["reference"]):
        assert (fast - truth).abs().max() <= 1.5 * (reference - truth).abs().max() + 1e-3


@pytest.mark.parametrize("mask_kind", ["none", "bool per head", "float"])
def test_attend_on_states_equals_sdpa(mask_kind):
    """attend over plain old states (16 bits) against SDPA with the key/value heads repeated:
    grouped queries, per-head masks broadcast over the batch, additive float masks."""
    generator = torch.Generator().manual_seed(0)
    query, old_keys, old_values = (torch.randn(2, h, t, 16, generator=generator) for h, t in ((4, 1), (2, 10), (2, 10)))
    window_keys, window_values = (torch.randn(2, 2, 3, 16, generator=generator) for _ in range(2))
    mask = None
    if mask_kind == "bool per head":
        mask = (torch.rand(1, 4, 1, 20, generator=generator) > 0.3)[..., -13:]
        mask[..., -1] = True
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 1, 13, generator=generator)
    out, _ = attention.attend(query, StoredKeys(old_keys), old_values, window_keys, window_values, mask, 0.25)
    keys = torch.cat([old_keys, window_keys], 2).repeat_interleave(2, 1)
    values = torch.cat([old_values, window_values], 2).repeat_interleave(2, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
