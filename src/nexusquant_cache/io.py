"""The cache file: one safetensors file, versioned, checksummed, validated before anything uses it.

Tensors are named ``layers.{i}.{name}`` with the names a layer's ``state_tensors`` gives, each
stored in the dtype it is held in. ``__metadata__`` holds four strings: ``format``
(``"nexusquant-cache"``), ``format_version``, ``header`` (JSON: config, tokens seen, model
fingerprint, prompt hash, one record per layer) and ``sha256`` over the other three and every
tensor's name, dtype, shape and bytes. Writes are atomic. No pickle anywhere. The layout, every
key and every check are in docs/file-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors
from torch import Tensor
from transformers import PretrainedConfig

from .config import NexusQuantConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CacheFile",
    "CacheFileError",
    "LayerRecord",
    "PromptMismatchError",
    "check_fingerprint",
    "model_fingerprint",
    "prompt_hash",
    "read",
    "write",
]

FORMAT = "nexusquant-cache"
FORMAT_VERSION = 5
# Version 2 added key conditioning (layer.py), version 3 tiered codes (a side's old part "tiered":
# codec/tiers.py), version 4 the config's ``target_ratio`` and ``merge_bias`` and a layer's
# ``logit_bias``, version 5 the config's ``scale_bits`` (8-bit log scales and their ``octave``); files of
# versions 1 (a plain key ``offset`` at most) to 4 still load.
READABLE_VERSIONS = ("1", "2", "3", "4", "5")
_TENSOR_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(.+)")


class CacheFileError(ValueError):
    """A cache file that cannot be used: not a cache file, another format version, damaged, or
    saved for another model or prompt. The message says which, and what was expected."""


class PromptMismatchError(CacheFileError):
    """The token ids given are not the prompt the cache holds."""


@dataclass
class LayerRecord:
    """One layer in a file: its window (None: full attention), the description its
    ``state_tensors`` gave, and its tensors by name."""

    sliding_window: int | None
    state: dict
    tensors: dict[str, Tensor]


@dataclass
class CacheFile:
    """The contents of a cache file.

    ``model`` is the fingerprint of the model the cache was built for (see
    :func:`model_fingerprint`; keys it could not know are None) and ``prompt``, when the ids were
    given, ``{"sha256": prompt_hash(ids[:, :length]), "length": length}``.
    """

    config: NexusQuantConfig
    tokens_seen: int
    model: dict
    prompt: dict | None
    layers: list[LayerRecord]
    version: int = FORMAT_VERSION  # the format version the file was written in


def model_fingerprint(model_config: PretrainedConfig, dtype: torch.dtype | str | None = None) -> dict:
    """What a cache depends on in a model: architecture, layers, heads, KV heads, head_dim,
    dtype (``dtype`` or the config's) and rotary settings, in the JSON form a file stores."""
    decoder = model_config.get_text_config(decoder=True)
    heads = decoder.num_attention_heads
    dtype = dtype if dtype is not None else getattr(model_config, "dtype", None)
    fingerprint = {
        "model_type": getattr(decoder, "model_type", None) or type(decoder).__name__,
        "architectures": getattr(model_config, "architectures", None),
        "num_hidden_layers": decoder.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(decoder, "num_key_value_heads", None) or heads,
        "head_dim": getattr(decoder, "head_dim", None) or decoder.hidden_size // heads,
        "hidden_size": decoder.hidden_size,
        "vocab_size": getattr(decoder, "vocab_size", None),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "rope": getattr(decoder, "rope_parameters", None),
    }
    return json.loads(json.dumps(fingerprint, default=str))


def check_fingerprint(stored: dict, expected: dict, path: str | os.PathLike) -> None:
    """Raise CacheFileError naming every field where the file's model differs from ``expected``;
    a field either side does not know is not compared."""
    differ = [
        f"{key} {value!r} in the file but {expected[key]!r} for this model"
        for key, value in stored.items()
        if value is not None and expected.get(key) is not None and value != expected[key]
    ]
    if differ:
        raise CacheFileError(f"{path} was saved for another model: " + "; ".join(differ))


def prompt_hash(ids) -> str:
    """sha256 (hex) of token ids: a sequence of ints or a [T] or [batch, T] integer tensor
    (a 1-D sequence is a batch of one)."""
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"token ids must be integers shaped [T] or [batch, T], not {ids.dtype} {list(ids.shape)}")
    digest = hashlib.sha256(f"{ids.shape[0]}x{ids.shape[1]}:".encode())
    digest.update(ids.to("cpu", torch.int64).numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def write(path: str | os.PathLike, contents: CacheFile) -> None:
    """Write ``contents`` to ``path`` atomically: a temporary file in the same folder, synced,
    then renamed over ``path``. A failure at any point leaves ``path`` as it was."""
    tensors = {
        f"layers.{index}.{name}": tensor.detach().to("cpu").contiguous()
        for index, layer in enumerate(contents.layers)
        for name, tensor in layer.tensors.items()
    }
    header = {
        "config": contents.config.to_dict(),
        "tokens_seen": contents.tokens_seen,
        "model": contents.model,
        "prompt": contents.prompt,
        "layers": [
            {
                "type": "full_attention" if layer.sliding_window is None else "sliding_attention",
                "sliding_window": layer.sliding_window,
                "state": layer.state,
            }
            for layer in contents.layers
        ],
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "header": json.dumps(header, separators=(",", ":")),
    }
    metadata["sha256"] = _checksum(metadata, tensors)
    _write_atomically(Path(path), save_safetensors(tensors, metadata))


def read(path: str | os.PathLike) -> CacheFile:
    """Read and check a file :func:`write` wrote; anything wrong raises CacheFileError.

    Checked in this order: a safetensors file, our format, our format version, the checksum over
    metadata and tensors, then the header's fields and the tensor names. The layers check their
    own tensors when they restore them."""
    metadata = _safetensors_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CacheFileError(
            f"{path} is a safetensors file but not a {FORMAT} file (metadata 'format' is "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CacheFileError(
            f"{path} has format version {metadata.get('format_version')!r}; this nexusquant-cache reads "
            f"versions {', '.join(READABLE_VERSIONS)}: use the version that wrote it, or save the cache again"
        )
    try:
        tensors = load_safetensors_file(path)  # read once into memory: no second copy of the file
    except Exception as error:  # safetensors raises its own error type for every malformed file
        raise CacheFileError(f"{path} is not a valid safetensors file ({error}): truncated or damaged") from None
    if not isinstance(metadata.get("sha256"), str) or metadata["sha256"] != _checksum(metadata, tensors):
        raise CacheFileError(f"{path} is damaged: its sha256 checksum does not match its contents")
    try:
        contents = _parse(json.loads(metadata["header"]), tensors)
        contents.version = int(metadata["format_version"])
        return contents
    except RecursionError:  # JSON nested deeper than Python parses
        raise CacheFileError(f"{path} has an invalid header: nested too deeply") from None
    except (ValueError, TypeError, KeyError) as error:
        raise CacheFileError(f"{path} has an invalid header: {error}") from None


def _safetensors_metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file: 8 bytes of header length, then a JSON header."""
    not_safetensors = f"{path} is not a safetensors file"
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 8:
            raise CacheFileError(f"{not_safetensors}: it has {size} bytes, fewer than the 8 of a header length")
        length = int.from_bytes(file.read(8), "little")
        if 8 + length > size:
            raise CacheFileError(
                f"{not_safetensors}, or it is truncated: its header claims {length} bytes and only "
                f"{size - 8} follow the header length"
            )
        text = file.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):  # undecodable bytes, not JSON, or nested too deeply to parse
        raise CacheFileError(f"{not_safetensors}: its header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CacheFileError(f"{path} has no safetensors metadata: it is not a {FORMAT} file")
    return metadata


def _checksum(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """sha256 over the metadata (its checksum aside) and each tensor's name, dtype, shape and
    bytes, in name order; independent of where safetensors lays the tensors out."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # name the file asked for, not the temporary one
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror} ({path.parent})") from None
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # mkstemp's 0o600 would surprise whoever shares the file
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # makes the rename itself durable
    finally:
        os.close(folder)


# Positions are held as int32: a cache never sees more tokens than that counts.
MAX_TOKENS = 2**31 - 1


def _parse(header: dict, tensors: dict[str, Tensor]) -> CacheFile:
    """The header's fields, checked for type and range, and the tensors grouped by layer."""
    config = NexusQuantConfig.from_dict(_field(header, "config", dict))
    tokens_seen = _field(header, "tokens_seen", int)
    if not 1 <= tokens_seen < MAX_TOKENS:
        raise ValueError(f"'tokens_seen' must be in [1, {MAX_TOKENS}) but is {tokens_seen}")
    model = _field(header, "model", dict)
    for key in ("num_hidden_layers", "num_key_value_heads", "head_dim"):  # what the tensors must fit
        if _field(model, key, int) < 1:
            raise ValueError(f"the model's {key!r} must be >= 1 but is {model[key]}")
    prompt = _field(header, "prompt", dict, optional=True)
    if prompt is not None:
        digest, length = _field(prompt, "sha256", str), _field(prompt, "length", int)
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or length != tokens_seen:
            raise ValueError(f"'prompt' must hold a sha256 of the {tokens_seen} tokens seen but is {prompt}")
        if "recipe" in prompt:  # how the ids were built (optional)
            _field(prompt, "recipe", str)
    layers = []
    for index, record in enumerate(_field(header, "layers", list)):
        kind, window = _field(record, "type", str), _field(record, "sliding_window", int, optional=True)
        valid = (kind, window is None) in {("full_attention", True), ("sliding_attention", False)}
        if not valid or (window is not None and window < 1):
            raise ValueError(
                f"layer {index} has type {kind!r} and sliding window {window!r}; allowed: 'full_attention' "
                "without a window, 'sliding_attention' with a window >= 1"
            )
        layers.append(LayerRecord(window, _field(record, "state", dict), {}))
    if len(layers) != model["num_hidden_layers"]:
        raise ValueError(f"'layers' lists {len(layers)} layers but the model has {model['num_hidden_layers']}")
    for name, tensor in sorted(tensors.items()):
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or int(match[1]) >= len(layers):
            raise ValueError(f"tensor {name!r} is not 'layers.<i>.<name>' with i < {len(layers)}")
        layers[int(match[1])].tensors[match[2]] = tensor
    return CacheFile(config, tokens_seen, model, prompt, layers)


def _field(record: dict, key: str, kind: type, optional: bool = False):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"missing {key!r}")
    value = record[key]
    if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{key!r} must be a {kind.__name__}{' or null' if optional else ''} but is {value!r}")
