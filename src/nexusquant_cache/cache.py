"""NexusQuantCache: a transformers Cache whose full-attention layers hold packed codes."""

from __future__ import annotations

import warnings
import weakref
from functools import partial

from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from .config import NexusQuantConfig
from .integration import capture_queries
from .layer import ATTENTION_SCORERS, NexusQuantLayer

__all__ = ["NexusQuantCache"]

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
        wants_queries = config.evicts and config.scorer in ATTENTION_SCORERS
        # Query capture needs the model; a failed switch is known only once tried (below).
        scorer = config.scorer if model is not None or not wants_queries else "keynorm"
        model_config = model.config if model is not None else model_config
        if model_config is None:
            if config.layer_overrides:
                raise ValueError("`layer_overrides` needs the model's layers: pass `model=` or `model_config=`")
            super().__init__(layer_class_to_replicate=partial(NexusQuantLayer, config, scorer))
        else:
            super().__init__(layers=_layers_for(model_config, config, scorer))
        if wants_queries and model is not None:
            release = capture_queries(model)
            if release is None:
                warnings.warn(
                    f"{type(model).__name__} cannot route its attention through NexusQuantCache's query "
                    f"capture; scoring with 'keynorm' instead of {scorer!r}",
                    stacklevel=2,
                )
                scorer = "keynorm"
                for layer in self.layers:
                    layer.scorer = scorer
            else:
                weakref.finalize(self, release)
        self.scorer = scorer

    def stats(self) -> dict:
        """Tokens seen and stored, bytes held by part, and the ratio against a 16-bit cache.

        ``bytes`` counts every tensor the cache holds: codes, scales, the full-precision windows
        (and old tokens of a side kept at 16 bits), and ``metadata``: token positions and scores
        when evicting, key offsets when centring. ``tokens_stored`` is per full-attention layer.
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
        }


def _layers_for(model_config: PretrainedConfig, config: NexusQuantConfig, scorer: str) -> list:
    decoder = model_config.get_text_config(decoder=True)
    model_type = getattr(decoder, "model_type", type(decoder).__name__)
    if getattr(decoder, "kv_lora_rank", None) is not None:
        raise NotImplementedError(
            f"NexusQuantCache does not support {model_type!r}: its latent-attention (MLA) cache holds "
            "compressed latents, not per-head keys and values"
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
    layers = []
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        layer_config = config.for_layer(index, len(layer_types))
        if layer_type == "full_attention":
            layers.append(NexusQuantLayer(layer_config, scorer))
        elif layer_type in _SLIDING_TYPES:
            layers.append(NexusQuantLayer(layer_config, scorer, sliding_window=kwargs["sliding_window"]))
        else:
            raise NotImplementedError(
                f"NexusQuantCache does not support {model_type!r} layers of type {layer_type!r}; "
                f"supported: 'full_attention', {', '.join(map(repr, _SLIDING_TYPES))}"
            )
    return layers
