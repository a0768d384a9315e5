"""The methods ("peers") an evaluation compares: named, buildable KV caches, and the bytes each holds.

A :class:`Method` is a name plus what builds its cache for a model:

- ``dynamic()``: transformers' ``DynamicCache``, the uncompressed reference.
- ``nexusquant(**fields)``: a :class:`~nexusquant_cache.NexusQuantCache` at any config
  (``NexusQuantConfig`` fields, or a preset); at 16 bits with ``keep_ratio < 1`` it is an
  eviction-only method, so the scorers (snapkv, h2o, keynorm, streaming) compare in one harness.
- ``quantized(backend, nbits)``: transformers' ``QuantizedCache`` (``quanto`` 2/4-bit, ``hqq``
  1-8 bit, or ``fp8``). Its backends are optional peers, never dependencies of this package:
  when one is missing or fails on this machine, :func:`unavailable_reason` says why in the
  backend's own words and the harness reports the method as unavailable.

Bytes (:func:`cache_bytes`) are counted from the tensors each cache really holds; see there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache

from ..cache import NexusQuantCache
from ..config import PRESETS, NexusQuantConfig

__all__ = [
    "BACKEND_BITS",
    "DEFAULT_METHODS",
    "KINDS",
    "Method",
    "cache_bytes",
    "dynamic",
    "nexusquant",
    "parse_method",
    "quantized",
    "tensor_bytes",
    "unavailable_reason",
]

KINDS = ("dynamic", "nexusquant", "quantized")
# Bits transformers' QuantizedCache accepts per backend (None: fp8 takes no group-wise options).
BACKEND_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8), "fp8": (None,)}
# What `nexusquant-cache eval` compares unless told otherwise (see parse_method for the syntax).
DEFAULT_METHODS = (
    "dynamic",
    "nq:preset=lossless",
    "nq:preset=balanced",
    "nq:preset=max",
    "nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=snapkv",
    "nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=h2o",
    "nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=keynorm",
    "nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=streaming",
    "quanto:4",
    "quanto:2",
    "hqq:4",
    "hqq:2",
)


@dataclass(frozen=True, eq=True)
class Method:
    """One compared method: ``name`` (unique in a run), ``kind`` (one of :data:`KINDS`) and
    ``options`` (NexusQuantConfig fields for ``"nexusquant"``; ``backend``, ``nbits``,
    ``residual_length``, ``q_group_size`` for ``"quantized"``; none for ``"dynamic"``)."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)

    __hash__ = None  # options is a dict

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a method's `name` must be a non-empty string but got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {list(KINDS)} but got {self.kind!r}")
        if self.kind == "dynamic" and self.options:
            raise ValueError(f"a dynamic method takes no options but got {sorted(self.options)}")
        if self.kind == "nexusquant":
            self.config()  # a wrong field raises here, naming it
        if self.kind == "quantized":
            _check_quantized(self.options)

    def config(self) -> NexusQuantConfig:
        """The NexusQuantConfig of a ``"nexusquant"`` method."""
        if self.kind != "nexusquant":
            raise ValueError(f"method {self.name!r} is {self.kind!r}, not 'nexusquant': it has no NexusQuantConfig")
        return NexusQuantConfig.from_dict(self.options)

    def build(self, model) -> Cache:
        """A fresh, empty cache of this method for ``model``."""
        if self.kind == "dynamic":
            return DynamicCache(config=model.config)
        if self.kind == "nexusquant":
            return NexusQuantCache(self.config(), model=model)
        options = dict(self.options)
        return QuantizedCache(options.pop("backend"), model.config, **options)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, values: dict) -> "Method":
        unknown = sorted(set(values) - {"name", "kind", "options"})
        if unknown:
            raise ValueError(f"unknown method fields {unknown}; allowed: ['kind', 'name', 'options']")
        return cls(values["name"], values["kind"], dict(values.get("options") or {}))


def dynamic(name: str = "DynamicCache") -> Method:
    """transformers' uncompressed DynamicCache."""
    return Method(name, "dynamic")


def nexusquant(name: str | None = None, preset: str | None = None, **fields: Any) -> Method:
    """A NexusQuantCache at ``preset`` (if any) with ``fields`` on top; named after its settings
    unless ``name`` is given (e.g. ``"NQ K4V2 keep 0.5"``, ``"16-bit keep 0.5 streaming"``)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {list(PRESETS)} but got {preset!r}")
        fields = {**PRESETS[preset], **fields}
    config = NexusQuantConfig.from_dict(fields)  # validates every field
    options = {key: value for key, value in fields.items()}
    return Method(name or _label(config, preset), "nexusquant", options)


def quantized(
    backend: str,
    nbits: int | None = None,
    residual_length: int | None = None,
    q_group_size: int | None = None,
    name: str | None = None,
) -> Method:
    """transformers' QuantizedCache with ``backend`` ``"quanto"``, ``"hqq"`` or ``"fp8"``; unset
    options keep transformers' defaults (``nbits`` 4, ``residual_length`` 128, ``q_group_size`` 64)."""
    options = {"backend": backend, "nbits": nbits, "residual_length": residual_length, "q_group_size": q_group_size}
    options = {key: value for key, value in options.items() if value is not None}
    _check_quantized(options)
    if name is None:
        name = "QuantizedCache fp8" if backend == "fp8" else f"{backend} int{options.get('nbits', 4)}"
    return Method(name, "quantized", options)


def parse_method(spec: "str | Method") -> Method:
    """A method from a short string, as the command line takes them:

    - ``dynamic``
    - ``nq`` (or ``nexusquant``), optionally ``:field=value,...`` with NexusQuantConfig fields
      and/or ``preset=NAME``: ``nq:preset=max``, ``nq:key_bits=4,value_bits=2,keep_ratio=0.5``,
      ``nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=h2o``
    - ``quanto:4``, ``quanto:2``, ``hqq:4``, ``hqq:2`` (bits), optionally
      ``,residual_length=N,q_group_size=N``; ``fp8``
    - any of these followed by ``@NAME`` sets the method's name: ``nq:preset=max@ours``

    Values are read as JSON when they parse (numbers, true/false, null), else as strings.
    """
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string but got {spec!r}")
    body, _, name = spec.strip().partition("@")
    head, _, rest = body.partition(":")
    head = head.strip().lower()
    name = name.strip() or None
    if head == "dynamic":
        if rest:
            raise ValueError(f"method spec {spec!r}: 'dynamic' takes no options")
        return dynamic(name or "DynamicCache")
    if head in ("nq", "nexusquant"):
        return nexusquant(name=name, **_options(rest, spec))
    if head in BACKEND_BITS:
        first, _, more = rest.partition(",")
        options = _options(more, spec)
        if first.strip():
            if "=" in first:
                options = {**_options(first, spec), **options}
            else:
                options["nbits"] = _value(first)
        return quantized(head, name=name, **options)
    raise ValueError(
        f"method spec {spec!r} must start with one of 'dynamic', 'nq', 'nexusquant', "
        f"{', '.join(map(repr, BACKEND_BITS))}"
    )


def unavailable_reason(method: Method, model) -> str | None:
    """None if ``method`` builds a cache for ``model`` and runs a short forward through it here;
    otherwise why not, as the error the backend raised (``"ImportError: ..."``).

    Only the optional peers (``"quantized"``) are probed: a failure of our own cache is a bug
    and is raised, not reported."""
    if method.kind != "quantized":
        return None
    try:
        cache = method.build(model)
        ids = torch.arange(3, 11, device=model.device)[None] % model.config.get_text_config().vocab_size
        with torch.inference_mode():
            model(ids, cache=cache)  # quantizes the whole prompt: the backend's kernels run once
            model(ids[:, :1], cache=cache, position_ids=torch.tensor([[ids.shape[1]]], device=model.device))
    except Exception as error:  # a peer may fail in any way; the harness reports, never hides, it
        return f"{type(error).__name__}: {error}".strip()
    return None


def tensor_bytes(obj, float_bytes: int | None = None) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, a tensor subclass such as quanto's packed
    tensors, which are opened down to their plain tensors, or tuples / lists / dicts of them).

    ``float_bytes``: count each floating-point number at this many bytes at most (2: what a
    16-bit model would hold for the same tensors)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name), float_bytes) for name in names)
        size = obj.element_size()
        if float_bytes is not None and obj.is_floating_point():
            size = min(size, float_bytes)
        return obj.numel() * size
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item, float_bytes) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item, float_bytes) for item in obj.values())
    return 0


def cache_bytes(cache: Cache) -> dict:
    """What ``cache`` holds, in bytes, counted from its tensors:

    - ``bytes``: the method's size. DynamicCache: its keys and values at 2 bytes per number
      (the 16-bit baseline, also for a float32 model). NexusQuantCache: ``cache.stats()``
      (codes, scales, full-precision windows, positions and scores; ``guarded_layers`` too).
      QuantizedCache: its
      quantized tensors with their scales and zero points, plus the full-precision residual
      window, each at the dtype it is held in.
    - ``tensor_bytes``: the sum of the storage of every tensor found in the cache's layers,
      opened independently of ``stats()``; for NexusQuantCache it must equal ``bytes``
      (``check`` says whether it does).
    - ``bytes_16bit``: ``bytes`` with floating-point numbers counted at 2 bytes at most: what
      the method holds when the model runs in 16 bits (the same as ``bytes`` for ours, whose
      windows are already float16; smaller for a QuantizedCache of a float32 model).
    """
    if isinstance(cache, NexusQuantCache):
        stats = cache.stats()  # settles every layer first
        held = [layer.state_tensors()[0] for layer in cache.layers]
        total = stats["bytes"]["total"]
        found = tensor_bytes(held)
        return {
            "bytes": total,
            "tensor_bytes": found,
            "check": found == total,
            "bytes_16bit": tensor_bytes(held, float_bytes=2),
            "parts": stats["bytes"],
            "baseline_bytes": stats["baseline_bytes"],
            "tokens_stored": stats["tokens_stored"],
            "guarded_layers": stats["guarded_layers"],
        }
    if isinstance(cache, QuantizedCache):
        held = [
            (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)
            for layer in cache.layers
            if layer.is_initialized
        ]
        quantized_part = tensor_bytes([h[:2] for h in held])
        residual = tensor_bytes([h[2:] for h in held])
        total = quantized_part + residual
        return {
            "bytes": total,
            "tensor_bytes": total,
            "check": True,
            "bytes_16bit": tensor_bytes(held, float_bytes=2),
            "parts": {"quantized": quantized_part, "residual": residual, "total": total},
        }
    held = [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]
    numbers = sum(tensor.numel() for pair in held for tensor in pair)
    return {
        "bytes": 2 * numbers,
        "tensor_bytes": tensor_bytes(held),
        "check": True,
        "bytes_16bit": 2 * numbers,
        "parts": {"states": 2 * numbers, "total": 2 * numbers},
    }


def _label(config: NexusQuantConfig, preset: str | None) -> str:
    if preset is not None and config == NexusQuantConfig.preset(preset):
        return f"NQ {preset}"
    bits = "16-bit" if not config.compresses else f"NQ K{config.key_bits}V{config.value_bits}"
    parts = [bits]
    if config.evicts:
        if config.keep_ratio < 1:
            parts.append(f"keep {config.keep_ratio:g}")
        if config.token_budget is not None:
            parts.append(f"budget {config.token_budget}")
        if config.target_ratio is not None:
            parts.append(f"target {config.target_ratio:g}x")
        parts.append(config.scorer)
    defaults = NexusQuantConfig().to_dict()
    shown = {"key_bits", "value_bits", "keep_ratio", "token_budget", "target_ratio", "scorer"}
    for name, value in config.to_dict().items():
        # The 32-token window the presets and benchmarks use goes without saying.
        if name in shown or value == defaults[name] or (name in ("recent_window", "block_size") and value == 32):
            continue
        parts.append(f"{name}={json.dumps(value, separators=(',', ':'))}")
    return " ".join(parts)


def _check_quantized(options: dict) -> None:
    unknown = sorted(set(options) - {"backend", "nbits", "residual_length", "q_group_size"})
    if unknown:
        raise ValueError(
            f"unknown QuantizedCache options {unknown}; allowed: backend, nbits, residual_length, q_group_size"
        )
    backend = options.get("backend")
    if backend not in BACKEND_BITS:
        raise ValueError(f"`backend` must be one of {list(BACKEND_BITS)} but got {backend!r}")
    if backend == "fp8":
        extra = sorted(set(options) - {"backend"})
        if extra:
            raise ValueError(f"the fp8 backend quantizes per tensor and takes no {extra}")
        return
    nbits = options.get("nbits", 4)
    if nbits not in BACKEND_BITS[backend]:
        raise ValueError(f"`nbits` for {backend!r} must be one of {list(BACKEND_BITS[backend])} but got {nbits!r}")
    for name in ("residual_length", "q_group_size"):
        value = options.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1 but got {value!r}")


def _options(text: str, spec: str) -> dict:
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"method spec {spec!r}: expected field=value but got {item!r}")
        options[key.strip()] = _value(value)
    return options


def _value(text: str):
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
