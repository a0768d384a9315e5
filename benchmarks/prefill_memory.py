"""Peak memory of a long prefill and of decoding after it: DynamicCache against NexusQuantCache
compressing between prefill chunks (SmolLM2-135M, float32, Emma).

Each variant runs in a fresh process; memory is the process's peak resident set (ru_maxrss)
minus its resident set once the model and tokens are loaded, so it covers the cache, the
activations and every temporary (the weights are paged in by a short forward first). Run on 2 CPU threads:

    python benchmarks/prefill_memory.py                      # 8,192 tokens, chunks of 512
    python benchmarks/prefill_memory.py --context 2048       # quicker
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time

import torch
from _austen import TEXT_DIR

VARIANTS = {
    "DynamicCache, one forward": (None, 0),
    "DynamicCache, chunked": (None, 1),
    "NexusQuantCache K4V4, chunked": (dict(key_bits=4, value_bits=4), 1),
    "NexusQuantCache K4V2 keep 0.5, chunked": (dict(key_bits=4, value_bits=2, keep_ratio=0.5), 1),
    "NexusQuantCache K4V4, one forward": (dict(key_bits=4, value_bits=4), 0),
}
DECODE_STEPS = 8  # held tokens at the end: context + DECODE_STEPS


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@torch.inference_mode()
def measure(name: str, context: int, chunk: int) -> dict:
    from transformers import DynamicCache

    from nexusquant_cache import NexusQuantCache, NexusQuantConfig
    from nexusquant_cache.models import load_smollm2

    torch.set_num_threads(2)
    fields, chunked = VARIANTS[name]
    model, tokenizer = load_smollm2()
    book = tokenizer((TEXT_DIR / "emma.txt").read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<|endoftext|>"), *book[5000 : 5000 + context - 1]]])
    if fields is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = NexusQuantCache(NexusQuantConfig(recent_window=32, block_size=32, **fields), model=model)
    model(ids[:, :8], cache=DynamicCache(config=model.config))  # pages the weights in: not the cache's memory
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed, so reuse of it shows as growth
    before = resident_bytes()
    start = time.perf_counter()
    step = chunk if chunked else context
    for begin in range(0, context, step):
        positions = torch.arange(begin, min(begin + step, context))[None]
        model(ids[:, begin : begin + step], cache=cache, position_ids=positions, logits_to_keep=1)
        print(f"  {name}: {min(begin + step, context)}/{context} tokens", file=sys.stderr, flush=True)
    prefill_seconds = time.perf_counter() - start
    prefill_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for i in range(DECODE_STEPS):
        model(ids[:, -1:], cache=cache, position_ids=torch.tensor([[context + i]]))
    decode_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if fields is None:
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    else:
        held = cache.stats()["bytes"]["total"]
    return dict(
        variant=name,
        context=context,
        chunk=step,
        cache_bytes=held,
        prefill_peak_bytes=prefill_peak,
        peak_after_decode_bytes=decode_peak,
        prefill_seconds=prefill_seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set for the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.context, args.chunk)))
        return
    mib = 1 << 20
    print("| variant | cache held | peak during prefill | peak after decoding | prefill time |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        command = [sys.executable, __file__, "--context", str(args.context), "--chunk", str(args.chunk)]
        output = subprocess.run([*command, "--variant", name], check=True, capture_output=True, text=True).stdout
        record = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(record), flush=True)
        print(
            f"| {name} | {record['cache_bytes'] / mib:.1f} MiB | {record['prefill_peak_bytes'] / mib:.1f} MiB | "
            f"{record['peak_after_decode_bytes'] / mib:.1f} MiB | {record['prefill_seconds']:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
