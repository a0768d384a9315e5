"""8-bit log scales (``scale_bits=8``): the codec's format, pieces joined at different octaves,
demotion's refit, and a cache that holds them (bytes, save/load, forged files)."""

import math

import pytest
import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, pages
from nexusquant_cache.codec import (
    Encoded,
    Tiered,
    decode,
    decode_units,
    encode,
    join,
    rotation_matrix,
    vector_nbytes,
)
from nexusquant_cache.codec.packing import unpack_words
from nexusquant_cache.codec.quantizers import quantizer
from tests.tiny_models import greedy, prompt, tiny_llama


def spread(vectors=400, dim=64, octaves=12, seed=0):
    """Gaussian vectors whose norms spread over ``octaves`` octaves."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(vectors, dim, generator=generator)
    return x * torch.exp2(torch.rand(vectors, 1, generator=generator) * octaves - octaves / 2)


def on_grid(values, octave):
    """Whether every nonzero value is 2 ** (octave + k / 16) for an integer k in [-254, 0]."""
    steps = 16 * (torch.log2(values[values > 0].double()) - octave)
    return bool(((steps - steps.round()).abs() < 1e-4).all() and steps.min() >= -254.5 and steps.max() <= 1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("method", ["e8", "scalar"])
def test_8_bit_scales_are_the_fit_on_a_log_grid_below_the_largest(bits, method):
    x = spread()
    wide, narrow = encode(x, bits, method, seed=3), encode(x, bits, method, seed=3, scale_bits=8)
    assert torch.equal(narrow.codes, wide.codes)  # the same codewords: only the scale's format differs
    assert narrow.scales.dtype == torch.uint8 and narrow.scale_bits == 8 and wide.scale_bits == 16
    exact, values = wide.scale_values(), narrow.scale_values()
    assert 2 ** (narrow.octave - 1) < exact.max() <= 2**narrow.octave * 1.004  # bfloat16 rounds the reference
    assert on_grid(values, narrow.octave)
    ratio = values / exact  # within half a step (2^(1/32) = 2.2%) of the fit, and bfloat16's 0.4% of it
    assert ratio.min() > 2 ** (-1 / 32) / 1.004 and ratio.max() < 2 ** (1 / 32) * 1.004
    # The stored bytes alone give the output: codewords times the table's scale, rotated back.
    blocks = quantizer(method, bits).dequantize(unpack_words(narrow.codes, bits).reshape(-1)).view_as(x)
    expected = (blocks * values[:, None]) @ rotation_matrix(64, seed=3)
    torch.testing.assert_close(decode(narrow), expected, rtol=0, atol=1e-5 * x.abs().max().item())
    # And the 8-bit error is the 16-bit one's: the scale's step adds little to the codes' error.
    errors = [((decode(e) - x).norm(dim=-1) / x.norm(dim=-1)).pow(2).mean() for e in (wide, narrow)]
    assert errors[1] < 1.05 * errors[0]


def test_8_bit_scales_take_one_byte_per_vector():
    encoded = encode(torch.randn(3, 5, 64), 2, scale_bits=8)
    held = encoded.codes.untyped_storage().nbytes() + encoded.scales.untyped_storage().nbytes()
    assert encoded.nbytes == held == 15 * vector_nbytes(64, 2, scale_bits=8) == 15 * 17
    assert vector_nbytes(64, 2) == 18


def test_a_vector_far_below_the_largest_becomes_zero_and_a_zero_vector_stays_zero():
    x = torch.randn(4, 64)
    x[1] *= 2.0**-20  # 16 octaves are held below the largest scale
    x[2] = 0
    encoded = encode(x, 4, scale_bits=8)
    assert encoded.scales[1] == 0 and encoded.scales[2] == 0 and (encoded.scales[[0, 3]] > 0).all()
    decoded = decode(encoded)
    assert torch.equal(decoded[[1, 2]], torch.zeros(2, 64))
    assert ((decoded[0] - x[0]).norm() / x[0].norm()) < 0.15


def test_scales_out_of_range_are_refused():
    with pytest.raises(ValueError, match="too large or too small to encode with 8-bit scales"):
        encode(torch.randn(2, 64) * 1e-36, 2, scale_bits=8)  # about 2^-120: below the lowest octave
    with pytest.raises(ValueError, match="`scale_bits` must be one of"):
        encode(torch.randn(2, 64), 2, scale_bits=4)
    codes = encode(torch.randn(2, 64), 2, scale_bits=8)
    for octave in (-111, 128, True, 1.0):
        with pytest.raises(ValueError, match="`octave` must be an integer"):
            Encoded(codes.codes, codes.scales, 2, "e8", 0, torch.float32, octave)
    with pytest.raises(ValueError, match=r"`octave` must be an integer in \[0, 0\]"):
        Encoded(codes.codes, torch.ones(2, dtype=torch.bfloat16), 2, "e8", 0, torch.float32, 3)


def test_pieces_at_different_octaves_join_with_their_values_kept():
    small, large = spread(octaves=4, seed=1) * 2.0**-3, spread(octaves=4, seed=2) * 2.0**3  # 10 octaves in all
    parts = [encode(small.view(2, 200, 64), 4, scale_bits=8), encode(large.view(2, 200, 64), 4, scale_bits=8)]
    assert parts[0].octave < parts[1].octave
    joined = join(parts)
    assert joined.octave == parts[1].octave
    kept = torch.cat([part.scale_values() for part in parts], -1)
    # Shifting by whole octaves is exact: every value is kept bit for bit (but those that would
    # fall below the 16 octaves held: none here).
    assert torch.equal(joined.scale_values(), kept)
    assert torch.equal(decode(joined), torch.cat([decode(part) for part in parts], -2))
    with pytest.raises(ValueError, match="need an octave of at least"):
        parts[1].at_octave(parts[0].octave)
    with pytest.raises(ValueError, match="share bits, method, seed and scale format"):
        join([parts[0], encode(small.view(2, 200, 64), 4)])
    # A piece far below the other loses what falls off the bottom: those scales become zero.
    tiny = encode(torch.randn(1, 3, 64) * 2.0**-30, 4, scale_bits=8)
    joined = join([tiny, encode(torch.randn(1, 3, 64), 4, scale_bits=8)], 1)
    assert (joined.scales[0, :3] == 0).all() and (joined.scales[0, 3:] > 0).all()


def test_an_evicted_outlier_no_longer_sets_the_octave():
    """A token 2^18 times larger than the rest sets its block's octave (its neighbours fall off
    the bottom); once eviction drops it, the next join lowers the octave to what is held
    (exactly), so new tokens are not zeroed."""
    x = torch.randn(1, 1, 4, 64)
    x[..., 1, :] *= 2.0**18
    block = encode(x, 4, scale_bits=8)
    kept = pages.take(block, torch.tensor([[[0, 2, 3]]]))  # the outlier evicted
    assert kept.octave == block.octave and kept.lowest_octave < block.octave - 15
    joined = join([kept, encode(torch.randn(1, 1, 2, 64), 4, scale_bits=8)], -1)
    assert joined.octave == joined.lowest_octave < block.octave - 15
    assert (joined.scales[..., 3:] > 0).all()  # without the lower octave: zero
    # Lowering is exact where the neighbours survived (an outlier 2^12 times larger).
    x[..., 1, :] /= 2.0**6
    kept = pages.take(encode(x, 4, scale_bits=8), torch.tensor([[[0, 2, 3]]]))
    lowered = kept.at_octave(kept.lowest_octave)
    assert lowered.octave < kept.octave - 10 and (lowered.scales > 0).all()
    assert torch.equal(lowered.scale_values(), kept.scale_values())
    # Read as pages (attention) or joined (decode, save): one octave, the same values.
    far = [encode(torch.randn(1, 1, 3, 64), 4, scale_bits=8), block]
    _, factor, _ = decode_units(far)
    _, joined_factor, _ = decode_units(join(far, -1))
    assert torch.equal(factor, joined_factor) and (factor[..., :3] == 0).all()  # 2^18 below: off the bottom


def test_demotion_refits_onto_the_grid_and_keeps_the_first_stage():
    states = spread(vectors=2 * 3 * 40).view(2, 3, 40, 64)
    split = Tiered.of(encode(states, 4, scale_bits=8))
    mask = torch.rand(2, 3, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    demoted = split.demote(mask)
    assert torch.equal(demoted.first.codes, split.first.codes) and demoted.first.scales.dtype == torch.uint8
    book = quantizer("e8", 2)
    c1 = book.dequantize(unpack_words(split.first.codes, 2).reshape(-1)).view(2, 3, 40, 64)
    c2 = book.dequantize(unpack_words(split.second, 2).reshape(-1)).view(2, 3, 40, 64)
    fit = ((c1 + c2 / 4) * c1).sum(-1) / (c1 * c1).sum(-1)
    refit = split.first.scale_values() * fit
    octave = max(split.first.octave, math.ceil(math.log2(refit.max())))
    expected = torch.exp2(torch.round(16 * (torch.log2(refit.double()) - octave)) / 16 + octave).float()
    values = demoted.first.scale_values()
    assert demoted.first.octave == octave and on_grid(values, octave)
    torch.testing.assert_close(values[mask], expected[mask], rtol=1e-6, atol=0)
    assert torch.equal(values[~mask], split.first.scale_values()[~mask])  # the others keep their codes' values


def test_a_cache_with_8_bit_scales_holds_a_byte_per_vector_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(batch=2, length=48)
    settings = dict(key_bits=4, value_bits=2, recent_window=8, block_size=8)
    caches = {bits: NexusQuantCache(NexusQuantConfig(**settings, scale_bits=bits), model=model) for bits in (16, 8)}
    runs = {bits: greedy(model, ids, max_new_tokens=6, cache=cache) for bits, cache in caches.items()}
    held = {bits: cache.stats()["bytes"] for bits, cache in caches.items()}
    old_vectors = sum(2 * 2 * layer.key_stream.old_length for layer in caches[8].layers) * 2  # (K, V) x batch x heads
    assert held[8]["scales"] == old_vectors and held[16]["scales"] == 2 * old_vectors
    assert held[8]["codes"] == held[16]["codes"] and held[8]["total"] == held[16]["total"] - old_vectors
    # Barely another model: the first scores agree closely, and the greedy tokens are the same.
    assert torch.equal(runs[8].sequences, runs[16].sequences)
    torch.testing.assert_close(runs[8].scores[0], runs[16].scores[0], atol=0.05, rtol=0)

    cache = NexusQuantCache(NexusQuantConfig(**settings, scale_bits=8), model=model)
    model(ids, cache=cache)
    path = tmp_path / "scales.nqc"
    cache.save(path, prompt_ids=ids)
    loaded = NexusQuantCache.load(path, model=model, prompt_ids=ids)
    assert loaded.config.scale_bits == 8 and loaded.stats()["bytes"] == cache.stats()["bytes"]
    for before, after in zip(cache.layers, loaded.layers):
        assert before.value_stream.old.octave == after.value_stream.old.octave
        assert torch.equal(before.value_stream.old.scales, after.value_stream.old.scales)


def test_a_stream_refuses_scales_that_do_not_match_its_config():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    cache = NexusQuantCache(NexusQuantConfig(value_bits=2, recent_window=8, block_size=8, scale_bits=8), model=model)
    model(prompt(batch=1, length=32), cache=cache)
    stream = cache.layers[0].value_stream
    cache.layers[0].settle()
    tensors, state = stream.state_tensors()
    assert tensors["scales"].dtype == torch.uint8 and isinstance(state["octave"], int)
    wrong = [
        ({**tensors, "scales": tensors["scales"].to(torch.bfloat16)}, state),  # bfloat16 in an 8-bit config
        (tensors, {k: v for k, v in state.items() if k != "octave"}),  # no octave: the magnitude is lost
        (tensors, {**state, "octave": 200}),
        (tensors, {**state, "octave": "3"}),
    ]
    for bad_tensors, bad_state in wrong:
        with pytest.raises(ValueError, match="octave|scales"):
            stream.restore(dict(bad_tensors), dict(bad_state))
    sixteen = NexusQuantCache(NexusQuantConfig(value_bits=2, recent_window=8, block_size=8), model=model)
    model(prompt(batch=1, length=32), cache=sixteen)
    sixteen.layers[0].settle()
    other = sixteen.layers[0].value_stream
    with pytest.raises(ValueError, match="scale_bits 16 holds bfloat16 without one"):
        other.restore(dict(tensors), dict(state))


def test_the_config_checks_scale_bits():
    assert NexusQuantConfig(scale_bits=8).scale_bits == 8
    for bad in (4, 8.0, True, "8"):
        with pytest.raises(ValueError, match="`scale_bits` must be one of"):
            NexusQuantConfig(scale_bits=bad)
        with pytest.raises(ValueError, match="`scale_bits` must be one of"):
            encode(torch.randn(2, 64), 2, scale_bits=bad)
