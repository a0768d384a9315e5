"""Quality against real compression of NexusQuantCache on a real model (SmolLM2-135M or
Gemma-3-270m), Jane Austen windows.

Protocol (as in shared/design/baselines.md): each window is a document-start token plus text
from Emma at token offsets 5000 + 50000 k (a shorter stride when more windows than fit);
prefill all but the last ``--score`` tokens, then score those teacher-forced in chunks of 64 at
their real positions, new tokens entering the cache as in decoding (quantized once they leave
the window, evicted to keep the budget). Perplexity change and mean KL divergence are against
DynamicCache on the same tokens, pooled over windows; the ratio is ``cache.stats()`` after the
last chunk (every byte held against a 16-bit DynamicCache). The protocol lives in
``nexusquant_cache.eval.perplexity_kl``; this script picks its windows and configurations and
prints the table (``nexusquant-cache eval`` runs it with peers and the other metrics).

    python benchmarks/cache_quality.py --windows 8         # 8 windows of 4096 tokens, ~30 minutes
    python benchmarks/cache_quality.py --windows 1 --context 1024 --score 128   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _austen import TEXT_HELP, read_book

from nexusquant_cache.eval import nexusquant, parse_method, perplexity_kl
from nexusquant_cache.models import OFFLINE_MODELS

CHUNK = 64
DOCUMENT_START = {"smollm2": "<|endoftext|>", "gemma3": "<bos>", "qwen2.5-coder-0.5b": "<|endoftext|>"}
CONFIGS = {
    "K4V4": dict(key_bits=4, value_bits=4),
    "K3V3": dict(key_bits=3, value_bits=3),
    "K4V2": dict(key_bits=4, value_bits=2),
    "K4V3": dict(key_bits=4, value_bits=3),
    "K4V3 keep 0.5": dict(key_bits=4, value_bits=3, keep_ratio=0.5),
    "K4V2 scalar": dict(key_bits=4, value_bits=2, method="scalar"),
    "K3V2 keep 0.5 scalar": dict(key_bits=3, value_bits=2, keep_ratio=0.5, method="scalar"),
    "K4V2 keep 0.25 scalar": dict(key_bits=4, value_bits=2, keep_ratio=0.25, method="scalar"),
    "K2V2": dict(key_bits=2, value_bits=2),
    "K4V4 keep 0.5": dict(key_bits=4, value_bits=4, keep_ratio=0.5),
    "K4V2 keep 0.5": dict(key_bits=4, value_bits=2, keep_ratio=0.5),
    "K3V2 keep 0.5": dict(key_bits=3, value_bits=2, keep_ratio=0.5),
    "K3V3 keep 0.5": dict(key_bits=3, value_bits=3, keep_ratio=0.5),
    "K3V3 keep 0.5 h2o": dict(key_bits=3, value_bits=3, keep_ratio=0.5, scorer="h2o"),
    "K4V4 keep 0.25": dict(key_bits=4, value_bits=4, keep_ratio=0.25),
    "K4V2 keep 0.25": dict(key_bits=4, value_bits=2, keep_ratio=0.25),
    "16-bit keep 0.5": dict(key_bits=16, value_bits=16, keep_ratio=0.5),
    "K4V4 centred": dict(key_bits=4, value_bits=4, center_keys=True),
    "K3V3 centred": dict(key_bits=3, value_bits=3, center_keys=True),
    "K4V2 centred": dict(key_bits=4, value_bits=2, center_keys=True),
    "K3V2 centred": dict(key_bits=3, value_bits=2, center_keys=True),
    "K2V2 centred": dict(key_bits=2, value_bits=2, center_keys=True),
    "K4V2 keep 0.5 centred": dict(key_bits=4, value_bits=2, keep_ratio=0.5, center_keys=True),
    "K4V4 keep 0.5 centred": dict(key_bits=4, value_bits=4, keep_ratio=0.5, center_keys=True),
    "16-bit keep 0.25": dict(key_bits=16, value_bits=16, keep_ratio=0.25),
    "16-bit keep 0.125": dict(key_bits=16, value_bits=16, keep_ratio=0.125),
    "16-bit keep 0.25 streaming": dict(key_bits=16, value_bits=16, keep_ratio=0.25, scorer="streaming"),
    "K4V2 keep 0.125": dict(key_bits=4, value_bits=2, keep_ratio=0.125),
    "K4V4 keep 0.125": dict(key_bits=4, value_bits=4, keep_ratio=0.125),
    "16-bit keep 0.5 merge values": dict(key_bits=16, value_bits=16, keep_ratio=0.5, merge="values"),
    "16-bit keep 0.5 merge keys_values": dict(key_bits=16, value_bits=16, keep_ratio=0.5, merge="keys_values"),
    "16-bit keep 0.25 merge values": dict(key_bits=16, value_bits=16, keep_ratio=0.25, merge="values"),
    "K4V2 keep 0.5 merge values": dict(key_bits=4, value_bits=2, keep_ratio=0.5, merge="values"),
    "16-bit keep 0.5 h2o": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="h2o"),
    "16-bit keep 0.5 keynorm": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="keynorm"),
    "16-bit keep 0.5 streaming": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="streaming"),
}
WINDOW = dict(recent_window=32, block_size=32)  # the full-precision window costs bytes: keep it short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--score", type=int, default=512)
    parser.add_argument(
        "--configs",
        nargs="*",
        default=list(CONFIGS),
        help="names from CONFIGS, or method specs as `nexusquant-cache eval --methods` takes them "
        "(quanto:4, hqq:2, nq:key_bits=4,...)",
    )
    parser.add_argument("--model", choices=list(OFFLINE_MODELS), default="smollm2")
    parser.add_argument("--text", help=TEXT_HELP)
    args = parser.parse_args()
    try:
        methods = [
            nexusquant(name, **{**WINDOW, **CONFIGS[name]}) if name in CONFIGS else parse_method(name)
            for name in args.configs
        ]
    except ValueError as error:
        parser.error(f"{error}\nknown --configs names: {list(CONFIGS)}")
    torch.set_num_threads(2)
    model, tokenizer = OFFLINE_MODELS[args.model]()
    book = tokenizer(read_book(args.text), add_special_tokens=False).input_ids
    start_token = tokenizer.convert_tokens_to_ids(DOCUMENT_START[args.model])
    # baselines.md's offsets (stride 50,000) up to 4 windows; more windows share Emma evenly.
    stride = min(50000, (len(book) - args.context - 5000) // max(args.windows - 1, 1))
    offsets = [5000 + stride * k for k in range(args.windows)]
    windows = [[start_token, *book[offset : offset + args.context - 1]] for offset in offsets]
    records = perplexity_kl(
        model, windows, methods, args.score, CHUNK, progress=lambda line: print(line, file=sys.stderr)
    )
    found = {(r["method"], r["metric"]): r for r in records}
    base = found["reference", "perplexity"]
    print("| method | ratio vs 16-bit | model in 16 bits | perplexity | change | KL (nats) | prefill | scoring |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["DynamicCache", *(method.name for method in methods)]:
        ppl = found.get(("reference" if name == "DynamicCache" else name, "perplexity"))
        if ppl is None or ppl["value"] is None:
            reason = next((r.get("unavailable") for r in records if r["method"] == name), "no result")
            print(json.dumps(dict(model=args.model, method=name, unavailable=reason)), flush=True)
            continue
        kl, held = found.get((name, "kl")), found.get((name, "bytes"))
        record = dict(
            model=args.model,
            method=name,
            windows=len(windows),
            context=args.context,
            scored=args.score,
            ratio=held["ratio"] if held else 1.0,
            # what the same cache would hold if the model ran in 16 bits (a float32 model's
            # 16-bit eviction-only cache or QuantizedCache residual is held in float32)
            ratio_16bit=held["ratio_16bit"] if held else 1.0,
            ppl=ppl["value"],
            ppl_change=ppl["change"],
            kl=kl["value"] if kl else 0.0,
            prefill_vs_dynamic=ppl["prefill_s"] / base["prefill_s"],
            scoring_vs_dynamic=ppl["scoring_s"] / base["scoring_s"],
        )
        print(json.dumps(record), flush=True)
        cells = [
            name,
            f"{record['ratio']:.2f}x",
            f"{record['ratio_16bit']:.2f}x",
            f"{record['ppl']:.2f}",
            f"{100 * record['ppl_change']:+.2f}%",
            f"{record['kl']:.4f}",
            f"{record['prefill_vs_dynamic']:.2f}x",
            f"{record['scoring_vs_dynamic']:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
