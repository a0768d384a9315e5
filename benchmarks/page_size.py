"""Decode-step time of one prefilled cache held in small pages against the same cache in one page.

Why the default page (``pages.PAGE_TOKENS``) is large: a decode step reads the codes joined,
so every step with several pages copies the codes once, while a page only saves the copy of the
history that appending a block to one tensor makes (once per ``block_size`` tokens).

Per context: one chunked prefill with the preset, then a copy of the cache re-laid in pages of
``--page-tokens``; the two decode the same tokens in alternating steps (noise falls on both);
the mean step of each is printed, over a whole number of blocks (64 steps after two warm-up
ones by default: two settles of the presets' 32-token blocks), so each side pays its settles.

    python benchmarks/page_size.py [--contexts 4096 16384] [--page-tokens 1024] [--preset lossless]

About 8 minutes on 2 otherwise idle CPU cores for the two contexts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval.data import builtin_texts, encode
from nexusquant_cache.models import load_model
from nexusquant_cache.pages import Pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--page-tokens", type=int, default=1024)
    parser.add_argument("--preset", default="lossless")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=66)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3: the first two are warm-up")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = encode(tokenizer, "".join(text for _, text in builtin_texts("python-docs")))
    print(
        f"| context | preset | pages of {args.page_tokens} per layer side | paged step | one-page step | paged / one |"
    )
    print("|---|---|---|---|---|---|")
    for context in args.contexts:
        one = NexusQuantCache(NexusQuantConfig.preset(args.preset), model=model)
        with torch.no_grad():
            for start in range(0, context, 1024):
                logits = model(torch.tensor([ids[start : min(start + 1024, context)]]), cache=one).logits
        one.stats()  # settles the last chunk
        paged = copy.deepcopy(one)
        for layer in paged.layers:
            for stream in (layer.key_stream, layer.value_stream):
                stream.pages = Pages.of(stream.pages.whole(), args.page_tokens)
        count = len(paged.layers[0].key_stream.pages.pages)
        token = logits[:, -1:].argmax(-1)
        times = {"paged": [], "one": []}
        with torch.no_grad():
            for _ in range(args.steps):
                for name, cache in (("paged", paged), ("one", one)):
                    start = time.perf_counter()
                    model(token, cache=cache)
                    times[name].append(time.perf_counter() - start)
        paged_ms, one_ms = (1e3 * statistics.mean(times[name][2:]) for name in ("paged", "one"))
        print(
            f"| {context} | {args.preset} | {count} | {paged_ms:.1f} ms | {one_ms:.1f} ms | {paged_ms / one_ms:.3f}x |"
        )


if __name__ == "__main__":
    main()
