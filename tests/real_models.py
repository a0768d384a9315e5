"""What the real-model tests share: a prompt's continuation scored through a cache."""

import torch


def teacher_forced(model, ids, cache, prefix: int):
    """Log-probabilities (float32) of the tokens after the first ``prefix``, teacher-forced through
    ``cache``: the prompt is prefilled, then the rest enters the cache in one forward at its positions."""
    with torch.no_grad():
        prefill = model(ids[:, :prefix], cache=cache).logits[:, -1:]
        positions = torch.arange(prefix, ids.shape[1] - 1)[None]
        rest = model(ids[:, prefix:-1], cache=cache, position_ids=positions).logits
    return torch.cat([prefill, rest], dim=1).float().log_softmax(-1)


def mean_kl(reference, logprobs) -> float:
    """Mean KL divergence of the next-token distributions ``logprobs`` from ``reference``."""
    return (reference.exp() * (reference - logprobs)).sum(-1).mean().item()


def check_target_ratio(model, ids, target: float) -> dict:
    """Prefill ``ids`` through a K4V2 cache with ``target_ratio``: right after the prompt's blocks
    are encoded the whole cache holds at most 1/target of a 16-bit cache's bytes, within 2%."""
    from nexusquant_cache import NexusQuantCache, NexusQuantConfig

    cache = NexusQuantCache(NexusQuantConfig.preset("compact", target_ratio=target), model=model)
    with torch.no_grad():
        model(ids, cache=cache)
    stats = cache.stats()
    assert stats["tokens_stored"] < stats["tokens_seen"]
    assert stats["bytes"]["total"] <= stats["baseline_bytes"] / target
    assert abs(stats["ratio"] / target - 1) <= 0.02, stats
    return stats
