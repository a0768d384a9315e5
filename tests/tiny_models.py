"""Tiny random models of the layouts the cache must serve, built from configs (no downloads)."""

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from nexusquant_cache.codec import Encoded, Tiered


def tiny_llama():
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def tiny_gemma3():
    config = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=512))


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}


def prompt(batch=2, length=40, seed=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, max_new_tokens=12, **kwargs):
    """Greedy generation with scores; kwargs go to generate (cache=, attention_mask=, ...)."""
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def held_storage(cache) -> int:
    """Bytes of every storage the cache's layers reference (storage, not element counts: a view
    that kept a larger tensor alive shows here; two views of one buffer count once)."""
    held = {}
    for layer in cache.layers:
        tensors = [layer.positions, layer.scores, layer.shift]
        for stream in (layer.key_stream, layer.value_stream):
            for page in stream.pages.pages:
                if isinstance(page, Tiered):
                    tensors += [page.first.codes, page.scales, page.second, page.packed_full]
                else:
                    tensors += [page.codes, page.scales] if isinstance(page, Encoded) else [page]
            # key conditioning: offsets, scales, the sinks' exact keys, RoPE frequencies
            tensors += [stream.recent, *stream._conditioning_tensors().values()]
        for tensor in tensors:
            if tensor is not None:
                held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(held.values())
