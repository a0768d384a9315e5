"""Peak memory of a long prefill and of decoding after it: DynamicCache against NexusQuantCache
compressing between prefill chunks (SmolLM2-135M, float32, Emma).

A thin wrapper over ``nexusquant_cache.eval.peak_memory``: each variant runs in a fresh process;
memory is the peak resident set above the process with the model loaded and its weights paged
in, so it covers the cache, the activations and every temporary. Run on 2 CPU threads:

    python benchmarks/prefill_memory.py                      # 8,192 tokens, chunks of 512
    python benchmarks/prefill_memory.py --context 2048       # quicker
"""

from __future__ import annotations

import argparse
import json
import sys

from _austen import TEXT_HELP, read_book

from nexusquant_cache.eval import dynamic, nexusquant, peak_memory
from nexusquant_cache.models import load_smollm2

WINDOW = dict(recent_window=32, block_size=32)
# (variant, method, prefill in chunks?)
VARIANTS = [
    ("DynamicCache, one forward", dynamic(), False),
    ("DynamicCache, chunked", dynamic(), True),
    ("NexusQuantCache K4V4, chunked", nexusquant(key_bits=4, value_bits=4, **WINDOW), True),
    ("NexusQuantCache K4V2 keep 0.5, chunked", nexusquant(key_bits=4, value_bits=2, keep_ratio=0.5, **WINDOW), True),
    ("NexusQuantCache K4V4, one forward", nexusquant(key_bits=4, value_bits=4, **WINDOW), False),
]
DECODE_STEPS = 8  # held tokens at the end: context + DECODE_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--text", help=TEXT_HELP)
    args = parser.parse_args()
    _, tokenizer = load_smollm2()
    book = tokenizer(read_book(args.text), add_special_tokens=False).input_ids
    ids = [tokenizer.convert_tokens_to_ids("<|endoftext|>"), *book[5000 : 5000 + args.context - 1]]
    mib = 1 << 20
    print("| variant | cache held | peak during prefill | peak after decoding | prefill time |")
    print("|---|---|---|---|---|")
    for variant, method, chunked in VARIANTS:
        chunk = args.chunk if chunked else None
        progress = lambda line: print(f"  {variant}: {line}", file=sys.stderr, flush=True)  # noqa: E731
        (found,) = peak_memory(
            "smollm2", ids, [method], DECODE_STEPS, threads=2, prefill_chunk=chunk, progress=progress
        )
        if found["value"] is None:
            raise RuntimeError(f"{variant}: {found['unavailable']}")
        record = dict(
            variant=variant,
            context=args.context,
            chunk=chunk or args.context,
            cache_bytes=found["held"],
            prefill_peak_bytes=found["prefill_peak"],
            peak_after_decode_bytes=found["value"],
            prefill_seconds=found["prefill_s"],
        )
        print(json.dumps(record), flush=True)
        print(
            f"| {variant} | {record['cache_bytes'] / mib:.1f} MiB | {record['prefill_peak_bytes'] / mib:.1f} MiB | "
            f"{record['peak_after_decode_bytes'] / mib:.1f} MiB | {record['prefill_seconds']:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
