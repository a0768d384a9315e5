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
