"""Prefill, compression step and decode step of NexusQuantCache against DynamicCache (SmolLM2-135M).

One 4,096-token window of Emma (the baselines.md protocol's first); the compression step is the
first settle of every layer after the prefill (encoding the survivors, after eviction); a decode
step is the mean of 16 single-token forwards at 4k context. Run on 2 CPU threads:

    python benchmarks/cache_speed.py
"""

from __future__ import annotations

import time

import torch
from _austen import TEXT_DIR
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.models import load_smollm2

CONFIGS = {
    "DynamicCache": None,
    "K4V4": dict(key_bits=4, value_bits=4),
    "K4V2": dict(key_bits=4, value_bits=2),
    "K4V4 keep 0.5": dict(key_bits=4, value_bits=4, keep_ratio=0.5),
    "K4V2 keep 0.25": dict(key_bits=4, value_bits=2, keep_ratio=0.25),
}
STEPS = 16


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    book = tokenizer((TEXT_DIR / "emma.txt").read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<|endoftext|>"), *book[5000:9095]]])
    print("| cache | prefill | compression step | share of prefill | decode step | decode speed vs DynamicCache |")
    print("|---|---|---|---|---|---|")
    dynamic_step = None
    for name, fields in CONFIGS.items():
        config = None if fields is None else NexusQuantConfig(recent_window=32, block_size=32, **fields)
        cache = DynamicCache() if config is None else NexusQuantCache(config, model=model)
        start = time.perf_counter()
        model(ids, cache=cache)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for layer in cache.layers:
            getattr(layer, "settle", lambda: None)()
        compress = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(STEPS):
            model(ids[:, -1:], cache=cache, position_ids=torch.tensor([[ids.shape[1] + i]]))
        step = (time.perf_counter() - start) / STEPS
        dynamic_step = dynamic_step or step
        print(
            f"| {name} | {prefill:.2f} s | {compress:.2f} s | {100 * compress / prefill:.0f}% | "
            f"{1000 * step:.0f} ms | {dynamic_step / step:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
