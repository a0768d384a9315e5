"""Forged files: every header field and every tensor of real cache files, changed one at a time
and saved with a checksum that matches, so what is tested is load's own validation. Each must be
refused with CacheFileError, or load into a cache the model runs to finite logits: a bad file
never reaches attention, and nothing else is ever raised."""

import json
import warnings
import zlib

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nexusquant_cache import CacheFileError, NexusQuantCache, NexusQuantConfig
from nexusquant_cache import io as cache_io
from tests.tiny_models import MODELS, prompt

SOURCES = {  # (model, config): an evicting quantized cache, a 16-bit one, a hybrid conditioned one
    "llama-evict": ("llama", NexusQuantConfig(key_bits=3, value_bits=2, recent_window=8, block_size=4, keep_ratio=0.5)),
    "llama-16bit": ("llama", NexusQuantConfig(key_bits=16, value_bits=16)),
    "gemma3-k4v4": ("gemma3", NexusQuantConfig(key_bits=4, value_bits=4, recent_window=8, block_size=4)),
}
HEADER_VALUES = [None, -1, 0, 2, 10**12, 1.5, float("nan"), "x", True, [], {}, [1, 2]]


def source(name, folder):
    """The model, and the metadata and tensors of a file its cache saved."""
    model_name, config = SOURCES[name]
    torch.manual_seed(0)
    model = MODELS[model_name]().eval()
    cache = NexusQuantCache(config, model=model)
    with torch.no_grad():
        model(prompt(batch=2, length=36), cache=cache)
    cache.save(folder / "source.nqc")
    data = (folder / "source.nqc").read_bytes()
    fields = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    return model, fields, load_safetensors(data)


def leaves(value, path=()):
    """Every (path, value) of a JSON tree, containers included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))


def replaced(tree, path, value):
    tree = json.loads(json.dumps(tree))
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return tree


def pick(options, label, count):
    """``count`` of ``options``, chosen by a hash of ``label``: every run forges the same files."""
    start = zlib.crc32(label.encode())
    return [options[(start + step * 7) % len(options)] for step in range(min(count, len(options)))]


def forged_tensors(tensor):
    """Changes of one tensor: non-finite or out-of-range values, another dtype, another shape."""
    flat = tensor.reshape(-1)
    if tensor.is_floating_point():
        for value in (float("nan"), float("inf"), -float("inf")):
            changed = flat.clone()
            changed[len(changed) // 2] = value
            yield f"value {value}", changed.view_as(tensor)
        yield "float8", tensor.to(torch.float8_e4m3fn)
        yield "int32", tensor.to(torch.int32)
    else:
        info = torch.iinfo(tensor.dtype)
        for value in (-5, info.max, min(10**9, info.max)):
            changed = flat.clone()
            changed[len(changed) // 2] = max(value, info.min)
            yield f"value {value}", changed.view_as(tensor)
        yield "float32", tensor.float()
    if tensor.dim() and tensor.shape[-1] > 1:
        yield "shorter", tensor[..., :-1].contiguous()
    yield "extra dim", tensor[None].contiguous()


def check(model, fields, tensors, tmp_path, what):
    fields = {**fields, "sha256": cache_io._checksum(fields, tensors)}
    path = tmp_path / "forged.nqc"
    path.write_bytes(save_safetensors(tensors, fields))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = NexusQuantCache.load(path, model=model)
    except CacheFileError:
        return "refused"
    with torch.no_grad():
        logits = model(prompt(batch=2, length=3, seed=5), cache=cache).logits
    assert torch.isfinite(logits).all(), f"{what}: loaded, and the model's logits are not finite"
    return "loaded"


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_header_field_forged(tmp_path, name):
    model, fields, tensors = source(name, tmp_path)
    header = json.loads(fields["header"])
    outcomes = []
    for path, _ in leaves(header):
        for value in pick(HEADER_VALUES, f"{name}{path}", 3):
            forged = {**fields, "header": json.dumps(replaced(header, path, value))}
            outcomes.append(check(model, forged, tensors, tmp_path, f"header {path} = {value!r}"))
    assert outcomes.count("refused") > len(outcomes) / 2  # most changes break something load must see


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_tensor_forged(tmp_path, name):
    model, fields, tensors = source(name, tmp_path)
    outcomes = []
    for tensor_name, tensor in tensors.items():
        for change, forged in forged_tensors(tensor):
            outcome = check(model, fields, {**tensors, tensor_name: forged}, tmp_path, f"{tensor_name}: {change}")
            outcomes.append(outcome)
            if change.startswith("value nan") or change in ("float8", "extra dim"):
                assert outcome == "refused", f"{tensor_name}: {change} was loaded"
    assert outcomes
