"""Compression time of the presets: seconds of the first settle after a one-forward prefill of
4,096 tokens (SmolLM2-135M, the built-in python-docs text, 2 CPU threads), min and median of
--reps runs. To compare two versions, run it in each (e.g. ``PYTHONPATH=other-checkout/src``),
alternating: single runs on a shared machine vary by 40%.

    python benchmarks/compression_time.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval.data import builtin_texts, encode
from nexusquant_cache.models import load_smollm2

PRESETS = ("lossless", "compact", "balanced")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    text = "".join(text for _, text in builtin_texts("python-docs"))
    ids = torch.tensor([encode(tokenizer, text)[:4096]])
    seconds = {preset: [] for preset in PRESETS}
    for _ in range(args.reps):
        for preset in PRESETS:
            cache = NexusQuantCache(NexusQuantConfig.preset(preset), model=model)
            model(ids, cache=cache)
            started = time.perf_counter()
            for layer in cache.layers:
                layer.settle()
            seconds[preset].append(time.perf_counter() - started)
    for preset, times in seconds.items():
        print(f"{preset}: min {min(times):.2f} s, median {statistics.median(times):.2f} s ({args.reps} runs)")


if __name__ == "__main__":
    main()
