"""NexusQuantCache: a transformers Cache whose full-attention layers hold packed codes."""

from __future__ import annotations

from functools import partial

from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .config import NexusQuantConfig
from .layer import NexusQuantLayer

__all__ = ["NexusQuantCache"]

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


class NexusQuantCache(Cache):
    """A KV cache that quantizes tokens once they leave a full-precision recent window.

    Pass it to ``model.generate(..., past_key_values=cache)`` or call the model with it.

    Args:
        config: what to compress and how (default: ``NexusQuantConfig()``).
        model: the model the cache serves; its config decides each layer's type. Without it
            every layer is a full-attention layer, created as the model first uses it.
        model_config: a model config instead of the model.

    Sliding-window layers (Gemma 2/3, Mistral with a window) keep transformers' own sliding
    layer at full precision.
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
        if model is not None:
            model_config = model.config
        if model_config is None:
            super().__init__(layer_class_to_replicate=partial(NexusQuantLayer, config))
        else:
            super().__init__(layers=_layers_for(model_config, config))

    def stats(self) -> dict:
        """Tokens seen and stored, bytes held by part, and the ratio against a 16-bit cache.

        ``bytes`` counts every tensor the cache holds: codes, scales, the full-precision window
        of quantized layers, and sliding-window layers. ``baseline_bytes`` is what a 16-bit
        DynamicCache built for the same model holds for the same tokens.
        """
        parts = {"codes": 0, "scales": 0, "window": 0, "sliding": 0}
        baseline = 0
        for layer in self.layers:
            if isinstance(layer, NexusQuantLayer):
                for part, size in layer.nbytes().items():
                    parts[part] += size
                baseline += 2 * sum(stream.numel_seen() for stream in (layer.key_stream, layer.value_stream))
            elif layer.is_initialized and layer.keys is not None:
                held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                parts["sliding"] += held
                baseline += 2 * (layer.keys.numel() + layer.values.numel())
        total = sum(parts.values())
        return {
            "tokens_seen": self.get_seq_length(),
            "bytes": {**parts, "total": total},
            "baseline_bytes": baseline,
            "ratio": baseline / total if total else 1.0,
        }


def _layers_for(model_config: PretrainedConfig, config: NexusQuantConfig) -> list:
    decoder = model_config.get_text_config(decoder=True)
    model_type = getattr(decoder, "model_type", type(decoder).__name__)
    if getattr(decoder, "kv_lora_rank", None) is not None:
        raise NotImplementedError(
            f"NexusQuantCache does not support {model_type!r}: its latent-attention (MLA) cache holds "
            "compressed latents, not per-head keys and values"
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
    layers = []
    for layer_type, kwargs in zip(layer_types, layer_kwargs):
        if layer_type == "full_attention":
            layers.append(NexusQuantLayer(config))
        elif layer_type in _SLIDING_TYPES:
            layers.append(DynamicSlidingWindowLayer(**kwargs))
        else:
            raise NotImplementedError(
                f"NexusQuantCache does not support {model_type!r} layers of type {layer_type!r}; "
                f"supported: 'full_attention', {', '.join(map(repr, _SLIDING_TYPES))}"
            )
    return layers
