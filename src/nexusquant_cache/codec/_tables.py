"""Memoised constant tensors (rotations, codebooks, levels)."""

from __future__ import annotations

import functools

import torch


def cached_table(maxsize: int | None):
    """``functools.lru_cache`` for functions that build constant tensors. They are built outside
    inference mode: a table first made under ``torch.inference_mode()`` would otherwise be an
    inference tensor, which later autograd-tracked code (a model called without no_grad) refuses."""

    def decorate(build):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        return cached

    return decorate
