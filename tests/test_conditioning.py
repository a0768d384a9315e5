"""Key conditioning: RoPE read from the model, exact inversion, offset removal, the guard,
save/load and eviction with conditioned keys."""

import warnings

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, decode, encode, io
from nexusquant_cache.codec import Encoded
from nexusquant_cache.conditioning import KeyConditioning, Rope, fit_key_conditioning, guard_limit, logit_error
from nexusquant_cache.integration import rotary_embeddings
from nexusquant_cache.layer import NexusQuantLayer

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def tiny_llama(rope_parameters=None, attention_bias=False, layers=3):
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rope_parameters=rope_parameters,
        attention_bias=attention_bias,
    )
    return LlamaForCausalLM(config).eval()


def tiny(name: str, layers: int = 4, **extra):
    """A tiny random ``{name}ForCausalLM`` of transformers with this file's head layout."""
    import transformers

    config = getattr(transformers, f"{name}Config")(
        vocab_size=97,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        **extra,
    )
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def tiny_stablelm():
    """Partial rotary (half of each head's channels), rotate_half convention, no k-norm."""
    return tiny("StableLm", layers=2, partial_rotary_factor=0.5)


def tiny_gemma3():
    """Two RoPEs, one per layer type (full attention linearly scaled, as Gemma 3's), and a k-norm
    before RoPE (hooked instead of k_proj)."""
    config = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        sliding_window=64,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    return Gemma3ForCausalLM(config).eval()


def ids_of(length, batch=1, seed=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def default_rope(dim=64, theta=10000.0, scaling=1.0):
    return Rope(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), scaling)


def relative(a, b):
    return ((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum()).item()


# ---------------------------------------------------------------------------------------------
# 1. Rope read from the model is the model's own rotary embedding


ROPE_CASES = {
    "default-random-theta": lambda: tiny_llama(
        {"rope_type": "default", "rope_theta": float(torch.empty(()).uniform_(500, 50000))}
    ),
    "linear": lambda: tiny_llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "yarn": lambda: tiny_llama(
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    ),
    "llama3": lambda: tiny_llama(
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "stablelm-partial": tiny_stablelm,
    "gemma3-per-layer-type": tiny_gemma3,
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_the_models_rotary_embedding(case):
    torch.manual_seed(0)
    model = ROPE_CASES[case]()
    ropes = rotary_embeddings(model)
    layers = model.model.layers
    assert len(ropes) == len(layers) and all(rope is not None for rope in ropes)
    if case == "stablelm-partial":
        assert 2 * ropes[0].inv_freq.shape[0] == HEAD_DIM // 2  # only the first half rotates
    if case == "yarn":
        assert ropes[0].scaling != pytest.approx(1.0)  # YaRN's attention factor multiplies cos and sin
    if case.startswith("gemma3"):  # the two layer types rotate at different frequencies
        assert not torch.equal(ropes[0].inv_freq, ropes[1].inv_freq)
    pre = {}
    hook_on = "k_norm" if case.startswith("gemma3") else "k_proj"
    hooks = [
        getattr(layer.self_attn, hook_on).register_forward_hook(lambda m, args, out, i=i: pre.__setitem__(i, out))
        for i, layer in enumerate(layers)
    ]
    length = 24
    positions = torch.arange(length) + 150  # far from 0: angles of every frequency matter
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(ids_of(length, batch=2), cache=cache, position_ids=positions.expand(2, -1))
    finally:
        for hook in hooks:
            hook.remove()
    exact = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=16), model=model)
    for i in range(len(layers)):
        before = pre[i].float() if hook_on == "k_norm" else pre[i].view(2, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
        after = cache.layers[i].keys.float()
        rope = ropes[i]
        torch.testing.assert_close(rope.apply(before, positions), after, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rope.apply(after, positions, inverse=True), before, atol=1e-5, rtol=1e-5)
        # A wrong position by one is far off: the check has teeth.
        assert (rope.apply(before, positions + 1) - after).abs().max() > 1e-2
        # The cache's layers carry the same rotary embedding.
        layer_rope = exact.layers[i].rope
        assert torch.equal(layer_rope.inv_freq, rope.inv_freq) and layer_rope.scaling == rope.scaling


@pytest.mark.parametrize("name", ["Cohere", "Helium"])
def test_a_rope_of_other_channel_pairs_is_not_used(name):
    # These rotate interleaved pairs (2i, 2i + 1), not (i, i + d/2): reading their frequencies
    # as ours would "remove" an offset rotated the wrong way. They get the plain mean instead.
    torch.manual_seed(0)
    model = tiny(name, head_dim=HEAD_DIM)
    assert rotary_embeddings(model) == [None] * 4
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=16, recent_window=4, block_size=4), model=model)
    with torch.no_grad():
        model(ids_of(40), cache=cache)
    cache.layers[0].settle()  # the first encode, which fits the conditioning
    stream = cache.layers[0].key_stream
    assert stream.conditioning is not None and stream.conditioning.rope is None


def test_rope_is_found_in_other_decoder_layouts():
    # GPT-NeoX names its attention `attention` (and rotates a quarter of each head here), Falcon
    # `self_attention` under `h`: their RoPE passes the probe, so it is used.
    torch.manual_seed(0)
    neox = tiny("GPTNeoX", rotary_pct=0.25)
    falcon = tiny("Falcon", new_decoder_architecture=True, num_kv_heads=KV_HEADS)
    assert [2 * len(rope.inv_freq) for rope in rotary_embeddings(neox)] == [HEAD_DIM // 4] * 4
    assert [2 * len(rope.inv_freq) for rope in rotary_embeddings(falcon)] == [HEAD_DIM] * 4


def test_layers_without_rope_and_dynamic_rope_get_none():
    torch.manual_seed(0)
    ropes = rotary_embeddings(tiny("SmolLM3", no_rope_layers=[1, 1, 1, 0], pad_token_id=0))  # 0: applies no RoPE
    assert [rope is None for rope in ropes] == [False, False, False, True]
    # Dynamic NTK RoPE changes its frequencies with the length: keys of one text mix several.
    dynamic = tiny_llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert rotary_embeddings(dynamic) == [None] * 3


# ---------------------------------------------------------------------------------------------
# 2. KeyConditioning is exactly invertible


@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_conditioning_round_trip_is_exact(with_rope, with_scale):
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 40, 32) * 5 + 20
    positions = torch.randint(0, 4000, (2, 3, 40))
    offset = torch.randn(2, 3, 1, 32) * 30
    scale = torch.rand(2, 3, 1, 32) * 3 + 0.2 if with_scale else None
    rope = default_rope(24, scaling=1.3) if with_rope else None  # partial: 8 channels pass through
    conditioning = KeyConditioning(offset, scale, rope)
    encoded = conditioning.forward(keys, positions)
    assert encoded.dtype == torch.float32
    torch.testing.assert_close(conditioning.inverse(encoded, positions), keys, atol=1e-4, rtol=1e-5)
    # What is added back is the shift at those positions: R(p) offset, or the plain offset.
    shift = conditioning.shift(positions)
    unscaled = encoded if scale is None else encoded / scale
    torch.testing.assert_close(unscaled, keys - shift, atol=1e-4, rtol=1e-5)
    if rope is not None:
        torch.testing.assert_close(shift, rope.apply(offset, positions))
        assert torch.equal(shift[..., 24:], offset[..., 24:].expand_as(shift[..., 24:]))  # unrotated channels
        # Decoding at other positions is wrong: positions matter.
        assert (conditioning.inverse(encoded, positions + 1) - keys).abs().max() > 1e-2
    else:
        assert torch.equal(shift, offset)


def test_rope_inverse_undoes_a_scaled_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    positions = torch.arange(5) * 37
    rope = default_rope(64, theta=500.0, scaling=1.7)
    rotated = rope.apply(x, positions)
    # A scaled rotation multiplies norms by the scaling (per pair).
    torch.testing.assert_close(rotated.norm(dim=-1), 1.7 * x.norm(dim=-1))
    torch.testing.assert_close(rope.apply(rotated, positions, inverse=True), x, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Conditioning removes a RoPE-rotated offset


def rotated_offset_keys(tokens=256, dim=64, norm=50.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rope = default_rope(dim)
    bias = torch.randn(1, 2, 1, dim, generator=generator)
    bias = bias / bias.norm(dim=-1, keepdim=True) * norm
    positions = torch.arange(tokens)[None, None]
    noise = torch.randn(1, 2, tokens, dim, generator=generator)
    return rope.apply(bias, positions) + noise, noise, positions, rope


def test_fit_removes_a_rotated_offset():
    keys, noise, positions, rope = rotated_offset_keys()
    conditioning, error = fit_key_conditioning(keys, positions, rope, None, 4, "e8", 0)
    assert error is None and conditioning.scale is None and conditioning.rope is rope
    residual = conditioning.forward(keys, positions)
    centred = keys - keys.mean(-2, keepdim=True)
    noise_energy = (noise - noise.mean(-2, keepdim=True)).pow(2).sum()
    # With RoPE undone the offset goes entirely: what is left is the noise (and its mean).
    assert residual.pow(2).sum() < 1.05 * noise_energy
    # A plain mean leaves the offset's fast-rotating channels in.
    assert centred.pow(2).sum() > 5 * noise_energy
    # End to end through the 4-bit codec, against the same codec on the centred and the raw keys.
    restored = conditioning.inverse(decode(encode(residual, 4)), positions)
    centre_only = KeyConditioning(keys.mean(-2, keepdim=True))
    centre_restored = centre_only.inverse(decode(encode(centre_only.forward(keys, positions), 4)), positions)
    plain = decode(encode(keys, 4))
    errors = {
        name: ((value - keys).pow(2).sum() / noise.pow(2).sum()).item()
        for name, value in (("conditioned", restored), ("centred", centre_restored), ("plain", plain))
    }
    assert errors["conditioned"] < 0.03, errors
    assert errors["centred"] > 3 * errors["conditioned"], errors
    assert errors["plain"] > 10 * errors["conditioned"], errors


def test_query_scale_is_kept_only_where_it_lowers_the_logit_error():
    keys, _, positions, rope = rotated_offset_keys(tokens=128)
    generator = torch.Generator().manual_seed(3)
    # Queries that look mostly at a few channel pairs (RoPE pairs i, i + 32): the scale should favour them.
    gain = torch.ones(64)
    gain[[0, 32, 5, 37]] = 20.0
    queries = torch.randn(1, 4, 16, 64, generator=generator) * gain
    conditioning, error = fit_key_conditioning(keys, positions, rope, queries, 4, "e8", 0, sinks=4)
    scale = conditioning.scale
    assert scale is not None and error.shape == (1, 2)
    torch.testing.assert_close(scale[..., :32], scale[..., 32:])  # one scale per RoPE pair: commutes with R(p)
    plain = KeyConditioning(conditioning.offset, None, rope)
    probe, probe_positions = keys[..., 4:, :], positions[..., 4:]
    plain_error = logit_error(queries, probe, plain, probe_positions, 4, "e8", 0)
    chosen_error = logit_error(queries, probe, conditioning, probe_positions, 4, "e8", 0)
    torch.testing.assert_close(error, chosen_error)  # the error reported is the chosen conditioning's
    assert (error <= plain_error + 1e-7).all()
    scaled = (scale != 1).any(-1).flatten()
    assert scaled.any() and (error[0][scaled] < 0.8 * plain_error[0][scaled]).all(), (error, plain_error)
    assert (scale[..., 0] > scale[..., 1]).all()  # the channels the queries look at get the finer steps


@pytest.mark.parametrize("mode", ["plain", "evicting", "sliding"])
def test_layer_conditions_every_block_at_its_own_positions(mode):
    """Blocks encoded after the fit use their own positions (also once a sliding window has
    dropped the first tokens): the error stays at the noise's scale."""
    keys, noise, _positions, rope = rotated_offset_keys(tokens=200)
    errors = {}
    for center in (None, False):
        config = NexusQuantConfig(
            key_bits=4,
            value_bits=16,
            recent_window=8,
            block_size=16,
            center_keys=center,
            **({"token_budget": 1000} if mode == "evicting" else {}),  # records positions, drops nothing
        )
        layer = NexusQuantLayer(config, rope=rope, sliding_window=101 if mode == "sliding" else None)
        for start in range(0, 200, 25):
            chunk = keys[..., start : start + 25, :]
            layer.update(chunk, chunk, position_ids=torch.arange(start, start + 25)[None])
        layer.settle()
        stream = layer.key_stream
        first = 200 - stream.length  # tokens a sliding window dropped
        assert stream.old_length >= 80 and first == (100 if mode == "sliding" else 0)
        stored = stream.old_states()
        held = slice(first, first + stream.old_length)
        errors[center] = ((stored - keys[..., held, :]).pow(2).sum() / noise[..., held, :].pow(2).sum()).item()
        if center is None:
            assert stream.conditioning is not None and stream.conditioning.rope is rope
            if mode != "sliding":  # sliding layers keep no sinks
                # The sinks (first 4 tokens) are stored as the window held them: exact up to float16.
                assert torch.equal(stored[..., :4, :], keys[..., :4, :].half().float())
    assert errors[None] < 0.03, errors
    assert errors[False] > 10 * errors[None], errors


# ---------------------------------------------------------------------------------------------
# 4. The guard


def biased_llama(bias=200.0, query_gain=5.0):
    """A tiny Llama whose key projection adds ``bias`` on the two slowest-rotating channels of
    every KV head (nearly constant after RoPE over a short prompt, so the model's attention does not
    change, but the codec's per-vector scale does). Queries are amplified so attention is sharp
    enough that key errors show in the logits."""
    torch.manual_seed(0)
    model = tiny_llama(attention_bias=bias is not None)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(query_gain)
            if bias is not None:
                offset = torch.zeros(KV_HEADS, HEAD_DIM)
                offset[:, [HEAD_DIM // 2 - 1, HEAD_DIM - 1]] = bias
                layer.self_attn.k_proj.bias.copy_(offset.flatten())
    return model


GUARD = {"key_bits": 4, "value_bits": 4, "recent_window": 4, "block_size": 4}
PROMPT, STEP = ids_of(64), ids_of(8, seed=2)


def continuation(model, cache):
    """Prefill PROMPT into ``cache``, return (warnings, logits of STEP continuing from it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(PROMPT, cache=cache)
            if isinstance(cache, NexusQuantCache):
                cache.stats()  # settles: the first encode, fit and guard run here
            logits = model(STEP, cache=cache).logits
    return [w for w in caught if issubclass(w.category, UserWarning)], logits


def test_guard_keeps_badly_conditioned_keys_exact():
    model = biased_llama()
    reference = DynamicCache(config=model.config)
    _, expected = continuation(model, reference)
    guarded = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=False), model=model)
    caught, guarded_logits = continuation(model, guarded)
    assert guarded.stats()["guarded_layers"] == [0, 1, 2]
    messages = [str(w.message) for w in caught]
    assert all(any(f"layer {i}'s 4-bit keys" in m and "guarded_layers" in m for m in messages) for i in range(3))
    for index, layer in enumerate(guarded.layers):
        stream = layer.key_stream
        assert stream.guarded and stream.bits == 16 and stream.conditioning is None and stream.exact is None
        assert max(stream.logit_error) > guard_limit(4)
        assert isinstance(layer.value_stream.old, Encoded)  # values are still quantized
        # The keys the guard kept are the prompt's keys as the window held them (float16 of float32).
        keys = reference.layers[index].keys
        assert torch.equal(stream.old[..., :60, :], keys[..., :60, :].half().float())
    # Without the model no queries are seen: the guard cannot run and the keys are quantized as they are.
    blind = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=False))
    caught_blind, blind_logits = continuation(model, blind)
    assert blind.stats()["guarded_layers"] == [] and not caught_blind
    guarded_error = (guarded_logits - expected).abs().max()
    blind_error = (blind_logits - expected).abs().max()
    assert guarded_error < 0.02 and blind_error > 3 * guarded_error, (guarded_error, blind_error)


def test_automatic_conditioning_needs_no_guard_on_biased_keys():
    model = biased_llama()
    _, expected = continuation(model, DynamicCache(config=model.config))
    blind = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=False))
    _, blind_logits = continuation(model, blind)
    cache = NexusQuantCache(NexusQuantConfig(**GUARD), model=model)
    caught, logits = continuation(model, cache)
    assert cache.stats()["guarded_layers"] == [] and not caught
    for layer in cache.layers:
        stream = layer.key_stream
        assert stream.conditioning is not None and stream.conditioning.rope is not None
        assert max(stream.logit_error) < guard_limit(4)
        # The offset found (RoPE undone) is the bias put on the key projection.
        offset = stream.conditioning.offset[0]  # [H, 1, d]
        assert (offset[..., [HEAD_DIM // 2 - 1, HEAD_DIM - 1]] - 200).abs().max() < 5
    error = (logits - expected).abs().max()
    assert error < 0.02 and (blind_logits - expected).abs().max() > 3 * error


@pytest.mark.parametrize("center", [None, False])
def test_unbiased_keys_are_not_guarded(center):
    model = biased_llama(bias=None, query_gain=1.0)
    _, expected = continuation(model, DynamicCache(config=model.config))
    cache = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=center), model=model)
    caught, logits = continuation(model, cache)
    assert cache.stats()["guarded_layers"] == [] and not caught
    assert all(layer.key_stream.logit_error is not None for layer in cache.layers)  # the guard did run
    torch.testing.assert_close(logits, expected, atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------
# 5. Save and load keep the conditioning


@pytest.mark.parametrize("center, guarded", [(None, []), (False, [0, 1, 2])])
def test_save_load_keeps_conditioning_and_guard(tmp_path, center, guarded):
    model = biased_llama() if center is False else biased_llama(bias=None, query_gain=1.0)
    cache = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=center), model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            model(PROMPT, cache=cache)
    path = tmp_path / "cache.nqc"
    cache.save(path)
    assert cache.stats()["guarded_layers"] == guarded
    contents = io.read(path)
    for record in contents.layers:
        if center is None:
            assert {"keys.offset", "keys.exact", "keys.rope_inv_freq"} <= set(record.tensors), sorted(record.tensors)
            assert record.state["keys"]["conditioned"] is True and record.state["keys"]["rope_scaling"] == 1.0
            assert record.tensors["keys.exact"].shape[-2] == 4
        else:
            assert record.state["keys"]["guarded"] is True and "keys.offset" not in record.tensors
    loaded = NexusQuantCache.load(path, model=model)
    assert loaded.stats()["guarded_layers"] == guarded
    for ours, theirs in zip(cache.layers, loaded.layers):
        a, b = ours.key_stream, theirs.key_stream
        assert a.guarded == b.guarded and a.bits == b.bits and a.logit_error == b.logit_error
        if a.conditioning is not None:
            assert torch.equal(a.conditioning.offset, b.conditioning.offset)
            assert (a.conditioning.scale is None) == (b.conditioning.scale is None)
            if a.conditioning.scale is not None:
                assert torch.equal(a.conditioning.scale, b.conditioning.scale)
            assert torch.equal(a.conditioning.rope.inv_freq, b.conditioning.rope.inv_freq)
            assert torch.equal(a.exact, b.exact)
    # Several steps continue identically (the later ones encode new blocks with the loaded state).
    with torch.no_grad():
        for seed in range(2, 5):
            step = ids_of(5, seed=seed)
            expected = model(step, cache=cache).logits
            actual = model(step, cache=loaded).logits
            assert torch.equal(actual, expected), seed
    assert cache.stats()["bytes"] == loaded.stats()["bytes"]


# ---------------------------------------------------------------------------------------------
# 6. Eviction with conditioning keeps the sinks exact

EVICT = NexusQuantConfig(key_bits=4, value_bits=4, keep_ratio=0.5, sink_tokens=4, recent_window=4, block_size=4)


def run_evicting(model, ids, mask, decode_steps=6):
    """Prefill then ``decode_steps`` single-token steps (the same tokens) through an evicting cache
    and a DynamicCache, positions from the mask as generate builds them. Returns both caches and the
    logits of every forward of the evicting cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = ids_of(decode_steps, batch=ids.shape[0], seed=7)
    cache = NexusQuantCache(EVICT, model=model)
    full = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for target in (cache, full):
            out = model(ids, attention_mask=mask, position_ids=positions, cache=target).logits
            if target is cache:
                logits.append(out)
            step_mask = mask
            for step in range(decode_steps):
                step_mask = torch.cat([step_mask, torch.ones_like(mask[:, :1])], -1)
                step_positions = positions[:, -1:] + 1 + step
                out = model(
                    steps[:, step : step + 1], attention_mask=step_mask, position_ids=step_positions, cache=target
                )
                if target is cache:
                    logits.append(out.logits)
    return cache, full, logits


@pytest.mark.parametrize(
    "prompt_length, pads",
    [
        (40, 0),
        (40, 6),  # the first encode already evicts: the padding goes before the sinks are stored
        (10, 3),  # the first encode keeps all
    ],
)
def test_eviction_keeps_conditioned_sinks_exact(prompt_length, pads):
    torch.manual_seed(0)
    model = tiny_llama()
    batch = 1 if pads == 0 else 2
    ids = ids_of(prompt_length, batch=batch)
    mask = torch.ones_like(ids)
    mask[0, :pads] = 0  # left padding on the first row
    ids = ids.masked_fill(mask == 0, 0)
    cache, full, logits = run_evicting(model, ids, mask)
    assert all(torch.isfinite(out).all() for out in logits)
    stats = cache.stats()
    seen = prompt_length + 6
    assert stats["tokens_seen"] == seen and stats["tokens_stored"] < seen  # something was evicted
    for layer, reference in zip(cache.layers, full.layers):
        layer.settle()
        stream = layer.key_stream
        assert stream.conditioning is not None and not stream.guarded
        stored = stream.old_states()
        for row in range(batch):
            start = pads if row == 0 else 0  # the row's first real token
            # Each head keeps the text's first four tokens (never evicted; padding may still precede them) ...
            held = layer.positions[row, :, : stream.old_length]
            first = int((held == -1).sum(-1).max())  # padding not evicted yet
            assert (held[:, :first] == -1).all()
            assert torch.equal(held[:, first : first + 4], torch.arange(4, dtype=torch.int32).expand(KV_HEADS, 4))
            # ... and returns their keys as the window held them (float16 of a float32 model), not decoded codes.
            sinks = reference.keys[row, :, start : start + 4].half().float()
            got = stored[row, :, first : first + 4]
            assert torch.equal(got, sinks), (row, (got - sinks).abs().amax(-1))
            # Every other kept old token decodes near its original key, at its own position.
            columns = (held[:, first:] + start).long()
            original = reference.keys[row].gather(1, columns[..., None].expand(-1, -1, HEAD_DIM))
            assert relative(stored[row, :, first:], original) < 0.05


def test_left_padded_rows_keep_their_sinks_exact_without_eviction():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = ids_of(40, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=4, recent_window=4, block_size=4), model=model)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        for target in (cache, full):
            model(ids, attention_mask=mask, position_ids=positions, cache=target)
    for layer, reference in zip(cache.layers, full.layers):
        layer.settle()
        stored = layer.key_stream.old_states()
        assert torch.equal(stored[1, :, :4], reference.keys[1, :, :4].half().float())  # unpadded row: exact
        assert torch.equal(stored[0, :, 6:10], reference.keys[0, :, 6:10].half().float())  # padded row: fails


# Defects a hostile review found, each pinned by a test.


def test_batch_operations_before_the_first_encode_remap_the_pending_queries():
    torch.manual_seed(0)
    model = tiny_llama()
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=4, recent_window=8, block_size=8), model=model)
    with torch.no_grad():
        model(ids_of(6, batch=2), cache=cache)  # nothing encoded yet: the queries wait for the first encode
        cache.batch_repeat_interleave(2)
        assert cache.layers[0].key_stream.queries.shape[0] == 4
        out = model(ids_of(12, batch=4, seed=2), cache=cache, position_ids=torch.arange(6, 18).expand(4, -1))
    cache.stats()  # settles: the first encode fits on the remapped queries
    assert torch.isfinite(out.logits).all() and cache.layers[0].key_stream.conditioning is not None


def padded_batch(length=40, pads=20):
    ids = ids_of(length, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :pads] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("chunk", [None, 8])
def test_left_padding_neither_trips_the_guard_nor_moves_the_sinks(chunk):
    """A padded row's first block may be nothing but padding (in chunks, a whole chunk): the guard
    and the fit look at real tokens only, and the row's sinks are its real first tokens."""
    torch.manual_seed(0)
    model = tiny_llama()
    ids, mask = padded_batch()
    config = NexusQuantConfig(key_bits=4, value_bits=4, recent_window=4, block_size=4)
    cache = NexusQuantCache(config, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no guard warning
        model.generate(
            ids, attention_mask=mask, cache=cache, max_new_tokens=2, prefill_chunk_size=chunk, pad_token_id=0
        )
    assert cache.stats()["guarded_layers"] == [] and cache.stats()["ratio"] > 1.5
    layer = cache.layers[0]
    assert layer.shift.flatten().tolist() == [-20, 0]
    assert layer.key_stream.exact_index[0, 0].tolist() == [20, 21, 22, 23]  # row 0's real first tokens
    assert layer.key_stream.exact_index[1, 0].tolist() == [0, 1, 2, 3]


def test_an_eager_model_keeps_its_attention_implementation():
    model = LlamaForCausalLM._from_config(tiny_llama().config, attn_implementation="eager").eval()
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=4), model=model)  # evicts nothing
    assert model.config._attn_implementation == "eager" and cache.layers[0].sees_queries is False


def test_a_guarded_float32_layer_holds_float16_old_keys():
    model = biased_llama()
    cache = NexusQuantCache(NexusQuantConfig(**GUARD, center_keys=False), model=model)
    caught, _ = continuation(model, cache)
    assert any("distort" in str(w.message) for w in caught)
    stream = cache.layers[cache.stats()["guarded_layers"][0]].key_stream
    assert stream.old.dtype == torch.float16 and stream.recent.dtype == torch.float16
    assert stream.old_states().dtype == torch.float32


@pytest.mark.parametrize("with_model", [True, False])
def test_a_cache_saved_before_its_first_encode_continues_exactly(tmp_path, with_model):
    torch.manual_seed(0)
    model = tiny_llama()
    config = NexusQuantConfig(key_bits=4, value_bits=4, recent_window=8, block_size=8)
    cache = NexusQuantCache(config, model=model)
    prompt = ids_of(10)
    with torch.no_grad():
        model(prompt, cache=cache)
    assert cache.layers[0].key_stream.queries is not None  # waiting for the first encode
    cache.save(tmp_path / "early.nqc")
    if with_model:
        loaded = NexusQuantCache.load(tmp_path / "early.nqc", model=model)
    else:
        with pytest.warns(UserWarning, match="without `model=`"):
            loaded = NexusQuantCache.load(tmp_path / "early.nqc")
    assert loaded.layers[0].key_stream.rope is not None  # saved: a load without the model has it too
    more = ids_of(20, seed=4)
    positions = torch.arange(10, 30)[None]
    with torch.no_grad():
        model(more, cache=cache, position_ids=positions)  # the first encode comes at the next forward
        model(more, cache=loaded, position_ids=positions)
        expected = model(ids_of(1, seed=5), cache=cache, position_ids=torch.tensor([[30]])).logits
        actual = model(ids_of(1, seed=5), cache=loaded, position_ids=torch.tensor([[30]])).logits
    assert loaded.layers[0].key_stream.conditioning.rope is not None
    if with_model:
        assert torch.equal(actual, expected)
    else:  # no queries after the load: the saved ones alone pick the scale, so close, not equal
        torch.testing.assert_close(actual, expected, atol=0.02, rtol=0)


def _drop_conditioning(tensors, state):
    """A file that says its codes were encoded without conditioning, in a cache that conditions:
    the next fit would decode them with a conditioning they never had."""
    for name in ("offset", "scale", "rope_inv_freq"):
        tensors.pop(f"keys.{name}")
    state.update(conditioned=False, rope_scaling=None)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, s: s.update(guarded=True, bits=16), "a guarded side holds no codes"),
        (lambda t, s: t.update({"keys.exact": t["keys.exact"][:, :, :1]}), "exact .* is not floating"),
        (
            lambda t, s: t.update({"keys.scale": torch.zeros_like(t["keys.offset"])}),
            r"scale must lie within \[1 / 1e\+06",
        ),
        (lambda t, s: t["keys.offset"].fill_(float("nan")), "offset must be finite"),
        (lambda t, s: t["keys.rope_inv_freq"].fill_(float("inf")), "rope_inv_freq must be finite"),
        (lambda t, s: t.update({"values.offset": t["keys.offset"].clone()}), "values: holds key conditioning"),
        (lambda t, s: t["keys.rope_inv_freq"].mul_(3), "RoPE frequencies or scaling other than the model's"),
        (_drop_conditioning, "holds codes but no key conditioning"),
    ],
)
def test_crafted_conditioning_state_is_refused_on_load(tmp_path, change, message):
    torch.manual_seed(0)
    model = tiny_llama()
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=4, recent_window=4, block_size=4), model=model)
    with torch.no_grad():
        model(ids_of(40), cache=cache)
    cache.save(tmp_path / "c.nqc")
    contents = io.read(tmp_path / "c.nqc")
    record = contents.layers[0]
    if "keys.scale" not in record.tensors:
        record.tensors["keys.scale"] = torch.ones_like(record.tensors["keys.offset"])
    if "values" in message:
        record.state["values"]["conditioned"] = True
    change(record.tensors, record.state["keys"])
    io.write(tmp_path / "crafted.nqc", contents)
    with pytest.raises(io.CacheFileError, match=message):
        NexusQuantCache.load(tmp_path / "crafted.nqc", model=model)


def test_a_file_whose_states_overflow_a_float16_model_is_refused(tmp_path):
    # Bounds that keep a float32 model's logits finite do not keep a float16 model's.
    torch.manual_seed(0)
    model = tiny_llama().half()
    cache = NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=4, recent_window=4, block_size=4), model=model)
    with torch.no_grad():
        model(ids_of(40), cache=cache)
    cache.save(tmp_path / "c.nqc")
    NexusQuantCache.load(tmp_path / "c.nqc", model=model)  # as saved: fine
    contents = io.read(tmp_path / "c.nqc")
    contents.layers[1].tensors["values.recent"] = torch.full(contents.layers[1].tensors["values.recent"].shape, 1e30)
    io.write(tmp_path / "crafted.nqc", contents)
    with pytest.raises(
        io.CacheFileError, match=r"layer 1: values: recent states are not finite in the model's torch.float16"
    ):
        NexusQuantCache.load(tmp_path / "crafted.nqc", model=model)
