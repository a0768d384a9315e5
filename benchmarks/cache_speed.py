"""Decode speed, prefill and compression time, and memory held, against DynamicCache and
transformers' QuantizedCache in the same run, at several contexts.

Per context, every method prefills the same ids (``--prefill-chunk`` tokens per forward, timed
with its final compression step apart), then all methods decode in alternating rounds
(``--rounds`` x ``--steps`` greedy tokens each), so a burst of noise on the shared machine falls
on every method alike; the decode time is the median step. Ratios are to DynamicCache's figures
of the same context: decode ``> 1`` is faster than DynamicCache. ``held`` is the bytes of the
cache's tensors after decoding (at the dtypes they are held in), against DynamicCache's.

    python benchmarks/cache_speed.py [--contexts 4096 8192 16384] [--model smollm2] [--threads 2]

SmolLM2-135M was trained to 8k tokens: at 16k its text is nonsense, its speed is not.
About 15 minutes on 2 otherwise idle CPU cores for the three contexts (timings from a busy
machine say nothing). Prints one table per context. The quanto row needs optimum-quanto
(``pip install -e ".[peers]"``, which the test set-up installs); without it the row is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nexusquant_cache.eval.data import builtin_texts, encode
from nexusquant_cache.eval.methods import cache_bytes, parse_method, unavailable_reason
from nexusquant_cache.models import load_model

METHODS = (
    "dynamic",
    "quanto:4",
    "nq:preset=lossless",
    "nq:preset=compact",
    "nq:preset=balanced",
    "nq:preset=max",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text = "".join(text for _, text in builtin_texts("python-docs"))
    ids = encode(tokenizer, text)
    methods = [parse_method(spec) for spec in args.methods]
    if methods[0].kind != "dynamic":
        raise SystemExit("the first method must be `dynamic`: ratios are to it")
    for method in methods:
        reason = unavailable_reason(method, model)
        if reason:
            print(f"{method.name}: unavailable ({reason})")
    methods = [method for method in methods if not unavailable_reason(method, model)]
    for context in args.contexts:
        if context > len(ids):
            raise SystemExit(f"the text has {len(ids)} tokens, fewer than the context {context}")
        print(f"\n## {args.model}, context {context}, {args.threads} threads, {model.dtype}\n")
        rows = measure(model, torch.tensor([ids[:context]]), methods, args)
        base = rows[methods[0].name]
        print("| method | prefill | final compression | decode step | decode vs DynamicCache | held |")
        print("|---|---|---|---|---|---|")
        for name, row in rows.items():
            compression = "inside the prefill" if row["compression_s"] is None else f"{row['compression_s']:.2f} s"
            if row["compression_s"]:
                compression += f" ({row['compression_s'] / row['prefill_s']:.0%} of prefill)"
            print(
                f"| {name} | {row['prefill_s']:.1f} s ({row['prefill_s'] / base['prefill_s']:.2f}x) | {compression} "
                f"| {row['step_ms']:.1f} ms | {base['step_ms'] / row['step_ms']:.2f}x "
                f"| {row['held'] / 1e6:.1f} MB ({row['held'] / base['held']:.2f}x) |"
            )


@torch.inference_mode()
def measure(model, ids: torch.Tensor, methods, args) -> dict[str, dict]:
    caches, rows, tokens = {}, {}, {}
    for method in methods:
        cache = method.build(model)
        started = time.perf_counter()
        for start in range(0, ids.shape[1], args.prefill_chunk):
            logits = model(ids[:, start : start + args.prefill_chunk], cache=cache, logits_to_keep=1).logits
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for layer in cache.layers:
            getattr(layer, "settle", lambda: None)()  # only NexusQuantCache defers its compression
        compression_s = {"dynamic": 0.0, "quantized": None}.get(method.kind, time.perf_counter() - started)
        caches[method.name], tokens[method.name] = cache, logits[:, -1:].argmax(-1)
        rows[method.name] = {"prefill_s": prefill_s, "compression_s": compression_s, "steps": []}
    for _ in range(args.rounds):
        for method in methods:
            cache, token = caches[method.name], tokens[method.name]
            for _ in range(args.steps):
                started = time.perf_counter()
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                rows[method.name]["steps"].append(time.perf_counter() - started)
            tokens[method.name] = token
    for name, row in rows.items():
        row["step_ms"] = 1000 * statistics.median(row.pop("steps"))
        row["held"] = cache_bytes(caches[name])["tensor_bytes"]
    return rows


if __name__ == "__main__":
    main()
