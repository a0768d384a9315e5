"""NexusQuantCache: a transformers Cache whose full-attention layers hold packed codes."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
import weakref
from functools import partial
from typing import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from . import io
from .allocation import ByteBudget
from .attention import Scratch
from .config import NexusQuantConfig
from .integration import ATTENTION_NAME, AttentionRoute, capture_queries, rotary_embeddings
from .io import CacheFileError, PromptMismatchError
from .layer import ATTENTION_SCORERS, MERGE_BIAS_LOST, NexusQuantLayer

__all__ = ["NexusQuantCache", "prefill"]

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


class NexusQuantCache(Cache):
    """A KV cache that quantizes tokens once they leave a full-precision recent window.

    Pass it to ``model.generate(..., cache=cache)`` (or the older ``past_key_values=``) or call
    the model with it.

    Args:
        config: what to compress and how (default: ``NexusQuantConfig()``).
        model: the model the cache serves; its config decides each layer's type. Without it
            every layer is a full-attention layer, created as the model first uses it.
        model_config: a model config instead of the model.

    Sliding-window layers (Gemma 2/3, Mistral with a window) keep their window semantics: they
    hold the last ``sliding_window - 1`` tokens, quantized like the others beyond the
    full-precision window, and never evict.

    The attention scorers (``"snapkv"``, ``"h2o"``) read the model's queries: while the cache
    lives, ``model`` runs its attention through the ``"nexusquant"`` function (transformers'
    SDPA plus a look at the queries), and its previous attention implementation comes back
    when the last such cache is garbage-collected. Without a model they fall back to
    ``"keynorm"``, which needs no queries.

    :meth:`save` writes the cache to one safetensors file and :meth:`load` reads it back, so a
    long prompt is prefilled once and reused later (see docs/file-format.md).

    Attributes:
        fingerprint: what the cache depends on in its model (see ``io.model_fingerprint``);
            None for a cache built without ``model=`` or ``model_config=``.
        prompt: ``{"sha256": ..., "length": ...}`` of the prompt ids given to :meth:`save`, or
            read by :meth:`load`; None when unknown.
    """

    def __init__(
        self,
        config: NexusQuantConfig | None = None,
        model: PreTrainedModel | None = None,
        model_config: PretrainedConfig | None = None,
    ):
        config = NexusQuantConfig() if config is None else config
        if not isinstance(config, NexusQuantConfig):
            raise TypeError(f"`config` must be a NexusQuantConfig but got {type(config).__name__}")
        self.config = config
        wants_queries = config.ranks and config.scorer in ATTENTION_SCORERS
        # Query capture needs the model; a failed switch is known only once tried (below).
        scorer = config.scorer if model is not None or not wants_queries else "keynorm"
        if scorer != config.scorer:
            warnings.warn(
                f"scorer {config.scorer!r} needs the model's queries: pass `model=` to NexusQuantCache; "
                "without it tokens are evicted by key norm ('keynorm'), which loses more quality",
                stacklevel=2,
            )
        model_config = model.config if model is not None else model_config
        self.fingerprint = None
        if model_config is not None:
            self.fingerprint = io.model_fingerprint(model_config, model.dtype if model is not None else None)
        self.prompt = None
        budget = None if config.target_ratio is None else ByteBudget(config.target_ratio, self)
        if model_config is None:
            if config.layer_overrides:
                raise ValueError("`layer_overrides` needs the model's layers: pass `model=` or `model_config=`")
            if config.evicts:
                warnings.warn(
                    "NexusQuantCache without `model=` or `model_config=` evicts in every layer: it cannot tell "
                    "sliding-window layers, which must keep their window, from full-attention ones",
                    stacklevel=2,
                )
            super().__init__(layer_class_to_replicate=partial(NexusQuantLayer, config, scorer, byte_budget=budget))
        else:
            ropes = rotary_embeddings(model) if model is not None else None
            super().__init__(layers=_layers_for(model_config, config, scorer, ropes, budget))
        # Where the model runs SDPA already, capture also serves every layer's first key encode
        # (conditioning and guard, layer.py) and lets decode steps attend to the codes as they are
        # (attention.py); its prefill runs SDPA, and it must not switch an eager model to it.
        quantized = any(stream.bits < 16 for layer in self.layers for stream in (layer.key_stream, layer.value_stream))
        on_sdpa = model is not None and model.config._attn_implementation in ("sdpa", ATTENTION_NAME)
        if model is not None and (wants_queries or config.merge_bias or quantized and on_sdpa):
            release = capture_queries(model)
            if release is None and wants_queries:
                warnings.warn(
                    f"{type(model).__name__} cannot route its attention through NexusQuantCache's query "
                    f"capture; scoring with 'keynorm' instead of {scorer!r}",
                    stacklevel=2,
                )
                scorer = "keynorm"
                for layer in self.layers:
                    layer.scorer = scorer
            elif release is not None:
                weakref.finalize(self, release)
                self._query_source = weakref.ref(model)
                route, scratch = AttentionRoute(model), Scratch()
                for layer in self.layers:
                    layer.sees_queries, layer.route, layer.scratch = True, route, scratch
        if config.merge_bias and config.evicts and self._query_source is None:
            warnings.warn(
                "`merge_bias` adds merged tokens' logit bias in the cache's own attention, which needs "
                "`model=` (a model whose attention SDPA computes); without it merged tokens attend with no bias",
                stacklevel=2,
            )
        self.scorer = scorer

    _query_source = None  # a weak reference to the model whose queries this cache captures

    def __deepcopy__(self, memo: dict) -> "NexusQuantCache":
        # transformers' prompt reuse copies a prefilled cache per request: each copy keeps the
        # model's queries flowing for as long as it lives, whatever happens to the original.
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for name, value in vars(self).items():
            setattr(copied, name, value if name == "_query_source" else copy.deepcopy(value, memo))
        model = self._query_source() if self._query_source is not None else None
        release = capture_queries(model) if model is not None else None
        if release is not None:
            weakref.finalize(copied, release)
        elif self._query_source is not None:
            copied._lose_queries("its model is gone" if model is None else "its model's attention was switched away")
        return copied

    def __copy__(self):
        raise TypeError(
            "a NexusQuantCache cannot be shallow-copied: the copy would share its layers with the original; "
            "use copy.deepcopy(cache)"
        )

    def __getstate__(self) -> dict:
        return {**vars(self), "_query_source": None}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        if any(layer.sees_queries for layer in self.layers):
            self._lose_queries("an unpickled cache has no model")

    def _lose_queries(self, why: str) -> None:
        """Without the model's queries: attention scorers fall back to 'keynorm', as without a model."""
        if self.scorer in ATTENTION_SCORERS and self.config.ranks:
            warnings.warn(f"NexusQuantCache: {why}, so scorer {self.scorer!r} falls back to 'keynorm'", stacklevel=3)
            self.scorer = "keynorm"
        if self.config.merge_bias and self.config.evicts:
            warnings.warn(f"{MERGE_BIAS_LOST} ({why})", stacklevel=3)
        for layer in self.layers:
            layer.sees_queries, layer.route = False, None
            if layer.scorer in ATTENTION_SCORERS:
                layer.score_by_key_norm()

    def stats(self) -> dict:
        """Tokens seen and stored, bytes held by part, and the ratio against a 16-bit cache.

        ``bytes`` counts every tensor the cache holds: codes, scales, the full-precision windows
        (and old tokens of a side kept at 16 bits), and ``metadata``: token positions and scores
        when evicting, the key conditioning (offsets, scales, the sinks' exact keys, RoPE
        frequencies). ``tokens_stored`` is per full-attention layer. ``guarded_layers``: the
        layers whose keys the guard keeps at full precision (see ``NexusQuantConfig.center_keys``).
        ``baseline_bytes`` is what a 16-bit DynamicCache built for the same model holds for the
        same tokens.
        """
        parts = {"codes": 0, "scales": 0, "window": 0, "metadata": 0}
        baseline = 0
        stored = None
        for layer in self.layers:
            if layer.is_initialized:
                for part, size in layer.nbytes().items():
                    parts[part] += size
                baseline += 2 * layer.baseline_numel()
                if not layer.is_sliding:
                    stored = layer.key_stream.length
        total = sum(parts.values())
        return {
            "tokens_seen": self.get_seq_length(),
            "tokens_stored": stored,
            "bytes": {**parts, "total": total},
            "baseline_bytes": baseline,
            "ratio": baseline / total if total else 1.0,
            "guarded_layers": [index for index, layer in enumerate(self.layers) if layer.key_stream.guarded],
        }

    def save(self, path: str | os.PathLike, prompt_ids=None, prompt_recipe: str | None = None) -> None:
        """Write the cache to ``path``: one safetensors file holding every tensor the cache holds
        (its size is ``stats()["bytes"]["total"]`` plus a small header), the config, the model's
        fingerprint and, given ``prompt_ids``, a hash of the prompt.

        The write is atomic: a failure leaves any previous file at ``path`` intact.

        Args:
            path: where to write (conventionally ``*.nqc``).
            prompt_ids: the token ids the cache has seen, [T] or [batch, T] (longer ids are
                fine: their first ``get_seq_length()`` tokens are hashed). A loaded cache can then
                check that a new input starts with them (:meth:`check_prompt`).
            prompt_recipe: with ``prompt_ids``, a line saying how to rebuild them (the text and the
                tokenizer call), so whoever loads the file can rebuild the ids it checks against.
        """
        seen = self.get_seq_length() if self.layers else 0
        if seen == 0:
            raise ValueError("the cache holds no tokens yet: run the model on a prompt before saving")
        layers = []
        for layer in self.layers:
            tensors, state = layer.state_tensors()
            layers.append(io.LayerRecord(layer.sliding_window, state, tensors))
        if prompt_recipe is not None and (prompt_ids is None or not isinstance(prompt_recipe, str)):
            raise ValueError("`prompt_recipe` must be a string and needs `prompt_ids`")
        if prompt_ids is not None:
            self.prompt = _prompt_record(prompt_ids, seen, self.layers[0].key_stream.recent.shape[0])
            if prompt_recipe is not None:
                self.prompt["recipe"] = prompt_recipe
        elif self.prompt is not None and self.prompt["length"] != seen:
            self.prompt = None  # a loaded prompt that tokens have been added to since: unknown now
        shape = self.layers[0].key_stream.recent.shape
        # Without the model's config, the file still pins what its tensors imply.
        fingerprint = self.fingerprint or dict(
            num_hidden_layers=len(self.layers), num_key_value_heads=shape[1], head_dim=shape[-1]
        )
        io.write(path, io.CacheFile(self.config, seen, fingerprint, self.prompt, layers))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: PreTrainedModel | None = None,
        device: torch.device | str | None = None,
        prompt_ids=None,
    ) -> "NexusQuantCache":
        """Read a cache :meth:`save` wrote; it continues as the saved cache would have.

        Everything is checked before use: anything wrong (not a cache file, another format
        version, damaged, saved for a model that differs from ``model``, tensors that disagree
        with the header) raises :class:`~nexusquant_cache.CacheFileError` saying what.

        Args:
            path: the file.
            model: the model that will use the cache: checked against the file's fingerprint,
                and, for the attention scorers, its queries are captured as by the constructor.
                Without it the layers are rebuilt from the file and the attention scorers fall
                back to ``"keynorm"``.
            device: where the tensors go (default: the model's device, or the CPU).
            prompt_ids: when given, :meth:`check_prompt` runs on them before returning.
        """
        contents = io.read(path)
        config, records = contents.config, contents.layers
        try:
            config.check_layers(len(records))
        except ValueError as error:
            raise CacheFileError(f"{path}: {error}") from None
        if model is not None:
            io.check_fingerprint(contents.model, io.model_fingerprint(model.config, model.dtype), path)
            cache = cls(config, model=model)
            model_windows = [layer.sliding_window for layer in cache.layers]
            file_windows = [record.sliding_window for record in records]
            if model_windows != file_windows:
                raise CacheFileError(
                    f"{path} has layers with sliding windows {file_windows} (None: full attention) "
                    f"but the model has {model_windows}"
                )
        else:
            fallback = config.ranks and config.scorer in ATTENTION_SCORERS
            warnings.warn(
                f"NexusQuantCache.load({str(path)!r}) without `model=`: the file is not checked against the "
                "model that will use it"
                + (f", and scorer {config.scorer!r} falls back to 'keynorm'" if fallback else ""),
                stacklevel=2,
            )
            # The layer count is in the file, so per-layer overrides need no model here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the constructor's scorer warning: said above
                cache = cls(dataclasses.replace(config, layer_overrides={}))
            cache.config, cache.layer_class_to_replicate, cache.fingerprint = config, None, contents.model
            budget = None if config.target_ratio is None else ByteBudget(config.target_ratio, cache)
            cache.layers = [
                NexusQuantLayer(
                    config.for_layer(index, len(records)),
                    cache.scorer,
                    record.sliding_window,
                    index=index,
                    byte_budget=budget,
                )
                for index, record in enumerate(records)
            ]
        if device is None:
            device = model.device if model is not None else "cpu"
        for index, (layer, record) in enumerate(zip(cache.layers, records)):
            tensors = {name: tensor.to(device) for name, tensor in record.tensors.items()}
            try:
                layer.restore(tensors, record.state)
                if model is not None and torch.finfo(model.dtype).max < torch.finfo(torch.float32).max:
                    layer.check_representable(model.dtype)  # bounds that hold for float32 do not for float16
            except ValueError as error:
                raise CacheFileError(f"{path}: layer {index}: {error}") from None
            except (TypeError, KeyError, IndexError, AttributeError) as error:  # a field of a type no check foresaw
                raise CacheFileError(
                    f"{path}: layer {index}: malformed state ({type(error).__name__}: {error})"
                ) from None
        _check_consistent(cache.layers, contents, path)
        cache.prompt = contents.prompt
        if prompt_ids is not None:
            try:
                cache.check_prompt(prompt_ids)
            except PromptMismatchError as error:
                raise PromptMismatchError(f"{path}: {error}") from None
        return cache

    def check_prompt(self, ids) -> None:
        """Raise :class:`~nexusquant_cache.PromptMismatchError` unless ``ids`` ([T] or [batch, T])
        start with the prompt this cache was saved with; e.g. the prompt plus a new question."""
        if self.prompt is None:
            raise PromptMismatchError("the cache has no prompt hash to check against: save it with `prompt_ids=`")
        length = self.prompt["length"]
        ids = torch.as_tensor(ids)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.shape[-1] < length:
            raise PromptMismatchError(f"the ids have {ids.shape[-1]} tokens but the cache's prompt has {length}")
        if io.prompt_hash(ids[:, :length]) != self.prompt["sha256"]:
            raise PromptMismatchError(
                f"the first {length} ids are not the prompt the cache was saved with (sha256 differs)"
            )


def _prompt_record(ids, seen: int, batch: int) -> dict:
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < seen:
        raise ValueError(
            f"`prompt_ids` must be [{batch}, >= {seen}] (the ids the cache has seen) but are {list(ids.shape)}"
        )
    return {"sha256": io.prompt_hash(ids[:, :seen]), "length": seen}


def _check_consistent(layers: list[NexusQuantLayer], contents: io.CacheFile, path) -> None:
    """What attention needs across layers: the same tokens seen, batch, and tokens stored in
    every full-attention layer (one mask serves them all), and the heads and head_dim of the file's model."""
    model = contents.model
    batches, stored = set(), set()
    for index, layer in enumerate(layers):
        recent = layer.key_stream.recent
        if layer.seen != contents.tokens_seen or recent is None:
            raise CacheFileError(f"{path}: layer {index} has seen {layer.seen} tokens, not {contents.tokens_seen}")
        heads, dim = recent.shape[1], recent.shape[-1]
        if (model.get("num_key_value_heads") or heads, model.get("head_dim") or dim) != (heads, dim):
            raise CacheFileError(
                f"{path}: layer {index} holds {heads} heads of dimension {dim} but the file's model has "
                f"{model.get('num_key_value_heads')} of {model.get('head_dim')}"
            )
        batches.add(recent.shape[0])
        if not layer.is_sliding:
            stored.add(layer.key_stream.length)
    if len(batches) > 1 or len(stored) > 1:
        raise CacheFileError(
            f"{path}: layers disagree on batch size {sorted(batches)} or full-attention tokens stored {sorted(stored)}"
        )


def _layers_for(
    model_config: PretrainedConfig, config: NexusQuantConfig, scorer: str, ropes: list | None, budget: ByteBudget | None
) -> list:
    decoder = model_config.get_text_config(decoder=True)
    model_type = getattr(decoder, "model_type", type(decoder).__name__)
    if getattr(decoder, "kv_lora_rank", None) is not None:
        raise NotImplementedError(
            f"NexusQuantCache does not support {model_type!r}: its latent-attention (MLA) cache holds "
            "compressed latents, not per-head keys and values"
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
    config.check_layers(len(layer_types))
    layers = []
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        layer_config = config.for_layer(index, len(layer_types))
        rope = ropes[index] if ropes is not None and index < len(ropes) else None
        if layer_type == "full_attention":
            layers.append(NexusQuantLayer(layer_config, scorer, rope=rope, index=index, byte_budget=budget))
        elif layer_type in _SLIDING_TYPES:
            sliding = kwargs["sliding_window"]
            layers.append(
                NexusQuantLayer(
                    layer_config, scorer, sliding_window=sliding, rope=rope, index=index, byte_budget=budget
                )
            )
        else:
            raise NotImplementedError(
                f"NexusQuantCache does not support {model_type!r} layers of type {layer_type!r}; "
                f"supported: 'full_attention', {', '.join(map(repr, _SLIDING_TYPES))}"
            )
    return layers


def prefill(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: Cache,
    chunk_size: int | None = 512,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run ``ids`` [batch, T] through ``model`` into ``cache`` (any transformers Cache),
    ``chunk_size`` tokens per forward (None: one forward) at positions after those the cache has seen.

    Chunks bound the memory of a long prefill: a NexusQuantCache compresses each chunk when the
    next one arrives, so it holds at most one chunk plus its window at full precision.
    ``progress(done, total)`` is called after each chunk. Returns the logits [batch, vocab] at
    the last position.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an integer >= 1 or None but got {chunk_size!r}")
    start, total = cache.get_seq_length(), ids.shape[1]
    if ids.dim() != 2 or total == 0:
        raise ValueError(f"`ids` must be [batch, tokens] with at least one token but have shape {list(ids.shape)}")
    step = chunk_size or total
    with torch.inference_mode():
        for begin in range(0, total, step):
            chunk = ids[:, begin : begin + step]
            positions = torch.arange(start + begin, start + begin + chunk.shape[1], device=ids.device)
            logits = model(chunk, cache=cache, position_ids=positions[None], logits_to_keep=1).logits
            if progress is not None:
                progress(begin + chunk.shape[1], total)
    return logits[:, -1]
