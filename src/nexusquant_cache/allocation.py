"""``target_ratio``: how many tokens every full-attention layer keeps so that the whole cache
holds at most 1/target_ratio of the bytes a 16-bit DynamicCache holds for the same tokens.

transformers builds one attention mask for all layers, so every full-attention layer keeps the
same number of tokens; what each costs differs (a layer whose keys the guard keeps exact, layer
overrides, demotion) and sliding-window layers hold their window whatever the budget. So the
count is chosen for the whole cache at once: the largest that fits, from each layer's own plan
of its bytes (``NexusQuantLayer.planned_nbytes``, which counts what ``stats()`` counts). It is
planned where a block of tokens is encoded, for the state right after it, so the cache meets
the budget there; until the next block, new tokens wait in the full-precision window.
"""

from __future__ import annotations

import warnings
import weakref

__all__ = ["ByteBudget"]


class ByteBudget:
    """The token budget of one cache's full-attention layers under ``target_ratio``.

    Holds the cache weakly (its layers hold this): a cycle would keep a dropped cache's
    tensors alive until the garbage collector runs. Copies and pickles follow the cache."""

    def __init__(self, target_ratio: float, cache):
        self.target_ratio = target_ratio
        self.cache = weakref.ref(cache) if cache is not None else lambda: None
        # (seen, tokens): planned once for all layers, which settle one after another; the same
        # count for each, even where a settled layer's bytes differ from its plan.
        self._planned: tuple[int, int] | None = None
        self._warned = False  # said once that the target is out of reach

    def forget(self) -> None:
        """Drop the planned count (the cache was reset: the same ``seen`` may come back)."""
        self._planned = None

    def tokens(self, seen: int) -> int:
        """Tokens each full-attention layer keeps after ``seen`` tokens: the most whose planned
        bytes fit the budget, never below ``config.budget_floor``."""
        if self._planned is not None and self._planned[0] == seen:
            return self._planned[1]
        cache = self.cache()
        if cache is None:
            raise RuntimeError(
                "a NexusQuantLayer with `target_ratio` plans with its cache's other layers, but that cache "
                "is gone (use the layer inside its NexusQuantCache, or deep-copy the whole cache)"
            )
        layers = [layer for layer in cache.layers if layer.is_initialized]
        allowed = sum(2 * layer.baseline_numel(seen) for layer in layers) / self.target_ratio
        floor = cache.config.budget_floor

        def fits(stored: int) -> bool:
            return sum(layer.planned_nbytes(seen, stored) for layer in layers) <= allowed

        low, high = floor, max(seen, floor)  # bytes grow with the tokens kept: bisect
        if fits(high):
            low = high
        elif not fits(low):
            self._out_of_reach(seen, floor)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        self._planned = (seen, low)
        return low

    def _out_of_reach(self, seen: int, floor: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"NexusQuantCache: target_ratio {self.target_ratio:g} cannot be met at {seen} tokens: what every "
            f"full-attention layer always holds ({floor} tokens: sink_tokens + recent_window + block_size) "
            "and any sliding-window layers take more than the budget, so the cache keeps that much and "
            "compresses less (stats()['ratio']); longer texts, or a smaller window and block (the presets "
            "use 32 and 32), reach it",
            stacklevel=4,
        )

    def __deepcopy__(self, memo: dict) -> "ByteBudget":
        cache = self.cache()
        # With the cache (the usual copy) the copy plans with the copied cache; a layer copied
        # alone keeps planning with the original one.
        return ByteBudget(self.target_ratio, memo.get(id(cache), cache))

    def __reduce__(self):
        return ByteBudget, (self.target_ratio, self.cache())
