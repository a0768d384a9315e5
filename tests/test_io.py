"""Saving and loading caches: exact continuation after a round trip, every damaged file refused."""

import json
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nexusquant_cache import CacheFileError, NexusQuantCache, NexusQuantConfig, PromptMismatchError, prompt_hash
from nexusquant_cache import io as cache_io
from tests.tiny_models import MODELS, greedy, prompt, tiny_llama

CONFIGS = {
    "evict-snapkv-centred": NexusQuantConfig(
        key_bits=3, value_bits=2, recent_window=8, block_size=4, keep_ratio=0.5, center_keys=True
    ),
    "evict-keynorm": NexusQuantConfig(
        key_bits=4, value_bits=2, recent_window=4, block_size=4, keep_ratio=0.4, scorer="keynorm"
    ),
    "16-bit": NexusQuantConfig(key_bits=16, value_bits=16),
    "mixed": NexusQuantConfig(
        key_bits=16, value_bits=3, recent_window=6, block_size=5, layer_overrides={0: {"key_bits": 2}}
    ),
    "8-bit-scales-demote": NexusQuantConfig(
        key_bits=4, value_bits=2, recent_window=6, block_size=4, keep_ratio=0.6, full_bits_ratio=0.5, scale_bits=8
    ),
}
QUESTION = prompt(batch=2, length=5, seed=3)


def build(name="llama", config="evict-snapkv-centred", length=40):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = prompt(batch=2, length=length)
    cache = NexusQuantCache(CONFIGS[config], model=model)
    model(ids, cache=cache)
    return model, ids, cache


def same_contents(first: bytes, second: bytes) -> bool:
    """Equal metadata and tensors (safetensors writes its metadata in no fixed order)."""
    tensors = [load_safetensors(data) for data in (first, second)]
    same_tensors = tensors[0].keys() == tensors[1].keys() and all(
        t.dtype == tensors[1][name].dtype and torch.equal(t, tensors[1][name]) for name, t in tensors[0].items()
    )
    return same_tensors and metadata(first) == metadata(second)


def metadata(data: bytes) -> dict:
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]


def continue_from(model, ids, cache, key="cache"):
    out = greedy(model, torch.cat([ids, QUESTION], dim=1), max_new_tokens=8, **{key: cache})
    return out.sequences, torch.stack(out.scores)


def assert_same_up_to_rounding(continued, expected):
    """The same tokens and scores within float rounding: a cache loaded without the model has no
    attention routed to it, so its decode steps decode the codes and run SDPA, where the model's
    cache attends to them in the rotated domain (attention.py)."""
    assert torch.equal(continued[0], expected[0])
    torch.testing.assert_close(continued[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_loaded_cache_continues_exactly_as_in_memory(tmp_path, name, config):
    model, ids, cache = build(name, config)
    path = tmp_path / "prompt.nqc"
    cache.save(path, prompt_ids=ids)
    loaded = NexusQuantCache.load(path, model=model, prompt_ids=torch.cat([ids, QUESTION], dim=1))
    assert loaded.stats() == cache.stats() and loaded.config == cache.config
    resaved = tmp_path / "again.nqc"
    loaded.save(resaved)
    assert same_contents(resaved.read_bytes(), path.read_bytes())  # the state came back bit for bit
    expected_tokens, expected_scores = continue_from(model, ids, cache)
    tokens, scores = continue_from(model, ids, loaded)
    assert torch.equal(tokens, expected_tokens) and torch.equal(scores, expected_scores)
    # the loaded cache keeps working: decoding appended, and eviction went on
    assert loaded.get_seq_length() == cache.get_seq_length() == ids.shape[1] + QUESTION.shape[1] + 7
    assert loaded.stats() == cache.stats()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # still supported; tested
def test_hybrid_layers_come_back_without_the_model(tmp_path):
    model, ids, cache = build("gemma3", "evict-keynorm")
    cache.save(tmp_path / "c.nqc")
    bare = NexusQuantCache.load(tmp_path / "c.nqc", device="cpu")
    assert [layer.sliding_window for layer in bare.layers] == [16, None, 16, None]
    assert bare.fingerprint == cache.fingerprint and bare.fingerprint["model_type"] == "gemma3_text"
    assert all(layer.key_stream.recent.device.type == "cpu" for layer in bare.layers)
    assert_same_up_to_rounding(continue_from(model, ids, bare, key="past_key_values"), continue_from(model, ids, cache))


def test_a_cache_built_without_the_model_pins_its_shapes(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(batch=2, length=40)
    cache = NexusQuantCache(CONFIGS["evict-keynorm"])  # layers created on use, no fingerprint
    model(ids, cache=cache)
    cache.save(tmp_path / "c.nqc")
    loaded = NexusQuantCache.load(tmp_path / "c.nqc", model=model, device=torch.device("cpu"))
    assert cache_io.read(tmp_path / "c.nqc").model == {"num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 16}
    # One cache has the model (decode steps attend to codes), the other not (they decode them).
    assert_same_up_to_rounding(continue_from(model, ids, loaded), continue_from(model, ids, cache))
    with pytest.raises(CacheFileError, match="num_hidden_layers 3 in the file but 2 for this model"):
        NexusQuantCache.load(tmp_path / "c.nqc", model=MODELS["gpt2"]())


def test_layer_overrides_load_without_a_model(tmp_path):
    model, ids, cache = build("llama", "mixed")
    cache.save(tmp_path / "c.nqc")
    loaded = NexusQuantCache.load(tmp_path / "c.nqc")
    assert [layer.key_stream.bits for layer in loaded.layers] == [2, 16, 16]
    assert_same_up_to_rounding(continue_from(model, ids, loaded), continue_from(model, ids, cache))


def test_what_a_cache_cannot_do_without_the_model_is_said(tmp_path):
    model, ids, cache = build()  # snapkv scores with the model's queries
    cache.save(tmp_path / "c.nqc")
    said = r"without `model=`: the file is not checked against the model .*scorer 'snapkv' falls back to 'keynorm'"
    with pytest.warns(UserWarning, match=said):
        assert NexusQuantCache.load(tmp_path / "c.nqc").scorer == "keynorm"
    with pytest.warns(UserWarning, match="scorer 'snapkv' needs the model's queries: pass `model=`"):
        assert NexusQuantCache(CONFIGS["evict-snapkv-centred"]).scorer == "keynorm"
    with pytest.warns(UserWarning, match="without `model=` or `model_config=` evicts in every layer"):
        NexusQuantCache(CONFIGS["evict-keynorm"])  # a sliding-window layer would be evicted too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing here
        NexusQuantCache.load(tmp_path / "c.nqc", model=model)
        NexusQuantCache(CONFIGS["evict-keynorm"], model_config=model.config)
        NexusQuantCache(CONFIGS["16-bit"])


def test_a_loaded_cache_that_went_on_saves_without_its_old_prompt(tmp_path):
    model, ids, cache = build()
    cache.save(tmp_path / "c.nqc", prompt_ids=ids)
    loaded = NexusQuantCache.load(tmp_path / "c.nqc", model=model, prompt_ids=ids)
    continue_from(model, ids, loaded)  # more tokens: the saved prompt no longer covers them
    loaded.save(tmp_path / "later.nqc")
    again = NexusQuantCache.load(tmp_path / "later.nqc", model=model)
    assert again.prompt is None and again.get_seq_length() == loaded.get_seq_length() > ids.shape[1]


def test_saving_into_a_missing_folder_names_the_file_asked_for(tmp_path):
    _, _, cache = build()
    target = tmp_path / "missing" / "c.nqc"
    with pytest.raises(FileNotFoundError, match=f"cannot write {re.escape(str(target))}: No such file"):
        cache.save(target)


def test_saving_into_a_read_only_folder_names_the_file_asked_for(tmp_path, monkeypatch):
    _, _, cache = build()
    target = tmp_path / "c.nqc"

    def refused(*args, **kwargs):  # what a read-only folder does (root, running the tests, may write anyway)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_io.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError, match=f"cannot write {re.escape(str(target))}: Permission denied"):
        cache.save(target)
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_recipe_is_kept_and_checked(tmp_path):
    _, ids, cache = build()
    cache.save(tmp_path / "c.nqc", prompt_ids=ids, prompt_recipe="ids = prompt(batch=2, length=40)")
    assert cache_io.read(tmp_path / "c.nqc").prompt["recipe"] == "ids = prompt(batch=2, length=40)"
    with pytest.raises(ValueError, match="`prompt_recipe` must be a string and needs `prompt_ids`"):
        cache.save(tmp_path / "d.nqc", prompt_recipe="no ids")


def test_prompt_hash_checks_the_prefix(tmp_path):
    model, ids, cache = build()
    with pytest.raises(ValueError, match=r"`prompt_ids` must be \[2, >= 40\]"):
        cache.save(tmp_path / "c.nqc", prompt_ids=ids[:, :30])
    cache.save(tmp_path / "c.nqc", prompt_ids=ids)
    assert cache.prompt == {"sha256": prompt_hash(ids), "length": 40}
    loaded = NexusQuantCache.load(tmp_path / "c.nqc", model=model)
    loaded.check_prompt(ids)
    loaded.check_prompt(torch.cat([ids, QUESTION], dim=1))  # the prompt plus a question
    other = ids.clone()
    other[1, 17] += 1
    with pytest.raises(PromptMismatchError, match="the first 40 ids are not the prompt"):
        loaded.check_prompt(other)
    with pytest.raises(PromptMismatchError, match="the ids have 39 tokens but the cache's prompt has 40"):
        loaded.check_prompt(ids[:, :39])
    with pytest.raises(PromptMismatchError, match=r"c\.nqc: the first 40 ids are not the prompt"):
        NexusQuantCache.load(tmp_path / "c.nqc", model=model, prompt_ids=other)
    cache.prompt = None
    cache.save(tmp_path / "anonymous.nqc")
    with pytest.raises(PromptMismatchError, match="save it with `prompt_ids=`"):
        NexusQuantCache.load(tmp_path / "anonymous.nqc").check_prompt(ids)


def test_prompt_hash_is_defined_by_the_ids_alone():
    assert prompt_hash([5, 6, 7]) == prompt_hash(torch.tensor([[5, 6, 7]], dtype=torch.int32))
    assert prompt_hash([5, 6, 7]) != prompt_hash([[5], [6], [7]])  # the shape counts
    with pytest.raises(ValueError, match="token ids must be integers"):
        prompt_hash(torch.ones(3))


def test_an_empty_cache_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="no tokens yet"):
        NexusQuantCache(model=tiny_llama()).save(tmp_path / "c.nqc")


def test_the_file_holds_the_cache_bytes_and_a_small_header(tmp_path):
    _, _, cache = build(length=200)
    cache.save(tmp_path / "c.nqc")
    data = (tmp_path / "c.nqc").read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    assert len(data) - 8 - header == cache.stats()["bytes"]["total"]
    assert header < 6000  # 3 layers: about 1.5 kB of metadata each
    assert oct(os.stat(tmp_path / "c.nqc").st_mode & 0o777) == "0o644"


# ---- refusing what cannot be used ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small valid file, its bytes, and the model it was saved for."""
    model, ids, cache = build(length=24)
    path = tmp_path_factory.mktemp("saved") / "c.nqc"
    cache.save(path, prompt_ids=ids)
    return path, path.read_bytes(), model


def load_bytes(tmp_path, data, **kwargs):
    path = tmp_path / "candidate.nqc"
    path.write_bytes(data)
    return NexusQuantCache.load(path, **kwargs)


def rewrite(tmp_path, saved, change):
    """The saved file after ``change(contents)`` edits what it holds, written with a valid checksum."""
    contents = cache_io.read(saved[0])
    change(contents)
    path = tmp_path / "crafted.nqc"
    cache_io.write(path, contents)
    return path


def test_a_file_for_another_model_is_refused(saved):
    path, _, model = saved
    torch.manual_seed(0)
    other = MODELS["llama"]()
    other.config.num_key_value_heads = 4  # only the fingerprint is read before refusing
    with pytest.raises(CacheFileError, match=r"saved for another model: num_key_value_heads 2 in the file but 4"):
        NexusQuantCache.load(path, model=other)
    with pytest.raises(CacheFileError, match="dtype 'float32' in the file but 'bfloat16' for this model"):
        NexusQuantCache.load(path, model=MODELS["llama"]().to(torch.bfloat16))
    with pytest.raises(CacheFileError, match="model_type 'llama' in the file but 'gemma3_text'"):
        NexusQuantCache.load(path, model=MODELS["gemma3"]())


def craft(saved, header_change=None, **metadata_changes):
    """The saved file's bytes with its header or metadata edited and, unless a change sets it,
    a checksum that matches."""
    fields = metadata(saved[1])
    tensors = load_safetensors(saved[1])
    if header_change is not None:
        header = json.loads(fields["header"])
        header_change(header)
        fields["header"] = json.dumps(header)
    fields = {key: value for key, value in {**fields, **metadata_changes}.items() if value is not None}
    if "sha256" not in metadata_changes:
        fields["sha256"] = cache_io._checksum(fields, tensors)
    return save_safetensors(tensors, fields)


def test_another_format_version_is_refused(tmp_path, saved):
    with pytest.raises(CacheFileError, match="format version '6'; this nexusquant-cache reads versions 1, 2, 3, 4, 5"):
        load_bytes(tmp_path, craft(saved, format_version="6"))
    with pytest.raises(CacheFileError, match="format version None"):
        load_bytes(tmp_path, craft(saved, format_version=None))
    with pytest.raises(CacheFileError, match="a safetensors file but not a nexusquant-cache file"):
        load_bytes(tmp_path, craft(saved, format="something-else"))
    with pytest.raises(CacheFileError, match="no safetensors metadata"):
        load_bytes(tmp_path, save_safetensors(load_safetensors(saved[1])))
    with pytest.raises(CacheFileError, match="damaged: its sha256 checksum"):
        load_bytes(tmp_path, craft(saved, sha256=None))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a safetensors file: it has 0 bytes"),
        (b"hello world, this is text\n", "not a safetensors file, or it is truncated"),
        (struct.pack("<Q", 5) + b"[1,2]", "no safetensors metadata"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
    ],
)
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, data, message):
    with pytest.raises(CacheFileError, match=message):
        load_bytes(tmp_path, data)


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path, saved):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(CacheFileError, match="its header is not JSON"):
        load_bytes(tmp_path, struct.pack("<Q", len(deep)) + deep.encode())
    fields = {**metadata(saved[1]), "header": deep}
    tensors = load_safetensors(saved[1])
    fields["sha256"] = cache_io._checksum(fields, tensors)
    with pytest.raises(CacheFileError, match="invalid header: nested too deeply"):
        load_bytes(tmp_path, save_safetensors(tensors, fields))


def test_a_pickle_file_is_refused_without_being_unpickled(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"keys": torch.zeros(3)}, path)
    with pytest.raises(CacheFileError, match="not a safetensors file"):
        NexusQuantCache.load(path)


def test_truncation_and_a_flipped_bit_are_refused(tmp_path, saved):
    data = saved[1]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    with pytest.raises(CacheFileError, match="truncated or damaged"):
        load_bytes(tmp_path, data[:-1])
    with pytest.raises(CacheFileError, match="not a safetensors file, or it is truncated"):
        load_bytes(tmp_path, data[: header_end - 1])
    for position in (header_end, len(data) - 1, (header_end + len(data)) // 2):  # tensor bytes
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        with pytest.raises(CacheFileError, match="damaged: its sha256 checksum does not match"):
            load_bytes(tmp_path, bytes(flipped))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.data())
def test_fuzzed_flips_and_truncations_are_refused(tmp_path, saved, data):
    original = saved[1]
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(original) - 1))
        damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    damaged = bytes(damaged[: data.draw(st.integers(0, len(original)))])
    assume(damaged != original)
    with pytest.raises(CacheFileError):
        load_bytes(tmp_path, damaged, model=saved[2])


@FUZZ
@given(start=st.integers(0, 600), junk=st.binary(min_size=1, max_size=40))
def test_fuzzed_header_bytes_are_refused(tmp_path, saved, start, junk):
    original = saved[1]
    damaged = original[:start] + junk + original[start + len(junk) :]
    assume(damaged != original)
    with pytest.raises(CacheFileError):
        load_bytes(tmp_path, damaged)


def drop_value_token(contents):
    recent = contents.layers[1].tensors["values.recent"]
    contents.layers[1].tensors["values.recent"] = recent[:, :, 1:]


def shorten_codes(contents):
    contents.layers[0].tensors["keys.codes"] = contents.layers[0].tensors["keys.codes"][..., :-3]


@pytest.mark.parametrize(
    "change, message",
    [
        (drop_value_token, "layer 1: keys and values hold different batch sizes, heads, token counts or head_dim"),
        (shorten_codes, r"layer 0: keys: codes decode to \[2, 2, 8, 8\], which does not fit recent \[2, 2, 8, 16\]"),
        (
            lambda c: c.layers[2].tensors.pop("positions"),
            r"layer 2: positions must be int32 \[2, 2, 16\] but is nothing",
        ),
        (
            lambda c: c.layers[0].tensors.pop("keys.offset"),
            r"keys: has tensors .* but needs \['codes', 'exact', 'exact_index', 'offset'",
        ),
        (
            lambda c: c.layers[0].state["keys"].update(bits=4),
            r"keys: holds 4-bit states \(guarded: False\) but the config gives this stream 3",
        ),
        (
            lambda c: c.layers[0].state["values"].update(seed=7),
            "values: codes were written with method 'e8' and seed 7",
        ),
        (lambda c: c.layers[0].state["values"].update(dtype="int8"), "codes decode to dtype 'int8'"),
        (lambda c: c.layers[0].state.update(seen=9), "layer 0: holds 16 tokens after 9 seen"),
        (lambda c: c.layers[2].tensors.update(extra=torch.zeros(2)), r"layer 2: holds tensors \['extra'\]"),
        (lambda c: vars(c).update(tokens_seen=25, prompt=None), "layer 0 has seen 24 tokens, not 25"),
        (
            lambda c: c.model.update(head_dim=32),
            "layer 0 holds 2 heads of dimension 16 but the file's model has 2 of 32",
        ),
        (  # a full-attention layer's sinks do not fit a sliding layer, nor do its tokens
            lambda c: setattr(c.layers[1], "sliding_window", 8),
            r"layer 1: keys: exact float16 \[2, 2, 4, 16\] is not floating \[2, 2, 0, 16\]",
        ),
    ],
)
def test_tensors_that_disagree_with_the_header_are_refused(tmp_path, saved, change, message):
    with pytest.raises(CacheFileError, match=message):
        NexusQuantCache.load(rewrite(tmp_path, saved, change))


def _edit(name, fn):
    """A change to layer 0's tensor ``name``: ``fn`` takes a copy and returns the forged one."""

    def change(contents):
        tensors = contents.layers[0].tensors
        tensors[name] = fn(tensors[name].clone())

    return change


def _fill(index, value):
    def fn(tensor):
        tensor[index] = value
        return tensor

    return fn


@pytest.mark.parametrize(
    "change, message",
    [  # each passes the checksum (rewritten) and the shapes: only the values are wrong
        (_edit("values.codes", _fill((0, 0, 0, slice(0, 2)), 255)), "no codeword of the 2-bit e8 codebook"),
        (_edit("values.scales", _fill((0, 0, 0), float("nan"))), "scales must be finite"),
        (_edit("keys.recent", _fill((0, 0, 0, 0), float("inf"))), "keys: recent must be finite"),
        (_edit("keys.recent", lambda t: t.to(torch.float8_e4m3fn)), r"keys: recent must be finite .*float8_e4m3fn"),
        (_edit("keys.exact", _fill((0, 0, 0, 0), float("nan"))), "keys: exact must be finite"),
        (_edit("scores", _fill((0, 0, 0), float("nan"))), "scores must be finite"),
        (_edit("positions", lambda t: torch.full_like(t, -1)), "nothing but padding"),
        (_edit("positions", _fill((0, 0, 0), 24)), r"positions must be -1 \(padding\) or in \[0, 24\)"),
        (_edit("positions", _fill((0, 0, 0), -7)), r"positions must be -1 \(padding\) or in \[0, 24\)"),
        # finite, but beyond anything a model produces: decoding or attention would overflow
        (_edit("keys.offset", _fill((0, 0, 0, 0), 3e38)), "offset must lie within"),
        (_edit("keys.scale", _fill((0, 0, 0, 0), 1e-44)), "scale must lie within"),
        (_edit("values.scales", _fill((0, 0, 0), 1.6e38)), "scales must be finite and below"),
        (_edit("keys.exact_index", lambda t: t.flip(-1)), "exact_index must point at the old tokens whose positions"),
    ],
)
def test_tensors_with_values_no_cache_holds_are_refused(tmp_path, saved, change, message):
    with pytest.raises(CacheFileError, match=message):
        NexusQuantCache.load(rewrite(tmp_path, saved, change), model=saved[2])


def test_the_model_and_the_file_must_agree_on_layer_types(tmp_path, saved):
    path = rewrite(tmp_path, saved, lambda c: setattr(c.layers[1], "sliding_window", 30))
    with pytest.raises(
        CacheFileError, match=r"sliding windows \[None, 30, None\] .* the model has \[None, None, None\]"
    ):
        NexusQuantCache.load(path, model=saved[2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h["config"].update(key_bits=5), "invalid header: `key_bits` must be one of"),
        (lambda h: h["config"].update(colour="red"), r"unknown NexusQuantConfig fields \['colour'\]"),
        (lambda h: h.update(tokens_seen="24"), "'tokens_seen' must be a int but is '24'"),
        (lambda h: h["layers"][0].update(type="moe"), "layer 0 has type 'moe'"),
        (lambda h: h["layers"].clear(), "'layers' lists 0 layers but the model has 3"),
        (lambda h: h.update(prompt={"sha256": "x", "length": 24}), "'prompt' must hold a sha256"),
        (lambda h: h.pop("model"), "missing 'model'"),
        (lambda h: h.update(layers=h["layers"][:2]), "'layers' lists 2 layers but the model has 3"),
        (
            lambda h: h.update(layers=h["layers"][:2], model={**h["model"], "num_hidden_layers": 2}),
            r"tensor 'layers.2.keys.codes' is not 'layers.<i>.<name>' with i < 2",
        ),
        (lambda h: h.update(model={}), "missing 'num_hidden_layers'"),  # an empty fingerprint fits any model
        (lambda h: h["model"].update(head_dim=0), "the model's 'head_dim' must be >= 1 but is 0"),
        (lambda h: h.update(tokens_seen=10**12), r"'tokens_seen' must be in \[1, 2147483647\) but is 10{12}"),
    ],
)
def test_an_invalid_header_is_refused(tmp_path, saved, change, message):
    with pytest.raises(CacheFileError, match=message):
        load_bytes(tmp_path, craft(saved, change))


# ---- atomic writes ----------------------------------------------------------------------------


class _HalfWriter:
    """A file whose write stops halfway with an error, as on a full disk."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def fileno(self):
        return self.file.fileno()

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError("simulated: no space left on device")


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_an_interrupted_save_keeps_the_previous_file(tmp_path, saved, monkeypatch, failing):
    path = tmp_path / "c.nqc"
    path.write_bytes(saved[1])
    _, _, other = build(length=30)
    if failing == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: _HalfWriter(real_fdopen(*args, **kwargs)))
    else:

        def fail(*args, **kwargs):
            raise OSError(f"simulated failure in os.{failing}")

        monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="simulated"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == saved[1] and sorted(os.listdir(tmp_path)) == ["c.nqc"]
    NexusQuantCache.load(path, model=saved[2])


# ---- a real model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_round_trip_and_file_size(tmp_path):
    """1k tokens of prose with the `max` preset (eviction by snapkv): the file is the cache's
    bytes plus under 2%, and the continuation after loading is the in-memory one."""
    from nexusquant_cache.eval import builtin_texts
    from nexusquant_cache.models import load_smollm2

    model, tokenizer = load_smollm2()
    text = builtin_texts("python-docs")[0][1][30_000:40_000]
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text).input_ids[:1023]]])
    question = tokenizer("\n\nWhat is this text about?", return_tensors="pt").input_ids
    cache = NexusQuantCache(NexusQuantConfig.preset("max"), model=model)
    with torch.no_grad():
        model(ids, cache=cache)
    path = tmp_path / "prose.nqc"
    cache.save(path, prompt_ids=ids)
    total = cache.stats()["bytes"]["total"]
    assert total < path.stat().st_size < 1.03 * total  # measured: +2.2%, a 45 kB header (fixed size)
    full = torch.cat([ids, question], dim=1)
    loaded = NexusQuantCache.load(path, model=model, prompt_ids=full)
    expected = greedy(model, full, max_new_tokens=6, cache=cache)
    actual = greedy(model, full, max_new_tokens=6, cache=loaded)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.scores), torch.stack(expected.scores), atol=1e-6, rtol=0)


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("version, atol", [(1, 1e-6), (2, 0.0), (3, 0.0), (4, 0.0)])
def test_files_of_earlier_format_versions_still_load(tmp_path, version, atol):
    """A file an earlier release wrote (tests/data) loads, serves the keys it served then (within
    float rounding for version 1, written before key conditioning; bit for bit for version 2,
    conditioned K4V2 with eviction, written just before the bump to version 3 in the layout every
    version 2 release wrote; for version 3, K4V4 with eviction and demotion to 2 bits, written
    just before the bump to version 4; for version 4, K4V2 with eviction and merging with a
    logit bias, written just before the bump to version 5), goes on, and saved again is a
    version 5 file."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = prompt(batch=2, length=40)
    path = DATA / f"format-v{version}-llama.nqc"
    assert metadata(path.read_bytes())["format_version"] == str(version)
    loaded = NexusQuantCache.load(path, model=model, prompt_ids=ids)
    expected = load_safetensors((DATA / f"format-v{version}-llama-keys.safetensors").read_bytes())
    for index, layer in enumerate(loaded.layers):
        stream = layer.key_stream
        stream.dtype = torch.float32
        served = torch.cat([stream.old_states(), stream.recent.float()], dim=-2)
        torch.testing.assert_close(served, expected[f"layer{index}"], atol=atol, rtol=0)
        if version == 4:  # every one of the 40 tokens is still counted by the merged tokens' biases
            counted = layer.logit_bias.float().exp().sum(-1)
            torch.testing.assert_close(counted, torch.full_like(counted, 40.0), atol=0.01, rtol=0)
    loaded.save(tmp_path / "again.nqc")
    assert metadata((tmp_path / "again.nqc").read_bytes())["format_version"] == "5"
    tokens, _ = continue_from(model, ids, loaded)
    assert tokens.shape[1] == ids.shape[1] + QUESTION.shape[1] + 8


@pytest.mark.parametrize("saved_dtype, model_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_file_saved_without_a_model_serves_a_model_of_another_dtype(tmp_path, saved_dtype, model_dtype):
    torch.manual_seed(0)
    weights = tiny_llama().state_dict()
    for name in ("evict-snapkv-centred", "evict-keynorm", "16-bit"):
        writer, reader = tiny_llama().eval(), tiny_llama().eval()
        writer.load_state_dict(weights)
        reader.load_state_dict(weights)
        writer, reader = writer.to(saved_dtype), reader.to(model_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no model: nothing is checked, keynorm scoring
            cache = NexusQuantCache(CONFIGS[name])
            with torch.no_grad():
                writer(prompt(), cache=cache)
            cache.save(tmp_path / "c.nqc")  # the file records no dtype
            loaded = NexusQuantCache.load(tmp_path / "c.nqc", model=reader)
        with torch.no_grad():
            logits = reader(prompt()[:, :9], cache=loaded).logits
        assert logits.dtype == model_dtype and torch.isfinite(logits).all()
        streams = [stream for layer in loaded.layers for stream in (layer.key_stream, layer.value_stream)]
        assert all(stream.old_states().dtype == model_dtype for stream in streams if stream.old is not None)
