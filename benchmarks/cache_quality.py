"""Quality against real compression of NexusQuantCache on a real model (SmolLM2-135M or
Gemma-3-270m), Jane Austen windows.

Protocol (as in shared/design/baselines.md): each window is a document-start token plus text
from Emma at token offsets 5000 + 50000 k; prefill all but the last ``--score`` tokens, then
score those teacher-forced in chunks of 64 at their real positions, new tokens entering the
cache as in decoding (quantized once they leave the window, evicted to keep the budget). Perplexity change and mean
KL divergence are against DynamicCache on the same tokens, pooled over windows; the ratio is
``cache.stats()`` after the last chunk (every byte held against a 16-bit DynamicCache).

    python benchmarks/cache_quality.py                     # 4 windows of 4096 tokens, ~15 minutes
    python benchmarks/cache_quality.py --windows 1 --context 1024 --score 128   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from _austen import TEXT_DIR
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.models import load_gemma3_270m, load_smollm2

CHUNK = 64
DOCUMENT_START = {"smollm2": "<|endoftext|>", "gemma3": "<bos>"}
CONFIGS = {
    "K4V4": dict(key_bits=4, value_bits=4),
    "K3V3": dict(key_bits=3, value_bits=3),
    "K4V2": dict(key_bits=4, value_bits=2),
    "K4V2 scalar": dict(key_bits=4, value_bits=2, method="scalar"),
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
    "16-bit keep 0.25": dict(key_bits=16, value_bits=16, keep_ratio=0.25),
    "16-bit keep 0.5 h2o": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="h2o"),
    "16-bit keep 0.5 keynorm": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="keynorm"),
    "16-bit keep 0.5 streaming": dict(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="streaming"),
}
WINDOW = dict(recent_window=32, block_size=32)  # a float32 window is costly: keep it short


@torch.inference_mode()
def run(model, ids: torch.Tensor, cache, score: int) -> tuple[torch.Tensor, float, float]:
    """Log-probabilities [score, vocab] of the scored tokens, prefill seconds, scoring seconds."""
    prefill = ids.shape[1] - score
    start = time.perf_counter()
    logits = [model(ids[:, :prefill], cache=cache).logits[:, -1:]]
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for begin in range(prefill, ids.shape[1] - 1, CHUNK):
        end = min(begin + CHUNK, ids.shape[1] - 1)
        positions = torch.arange(begin, end)[None]
        logits.append(model(ids[:, begin:end], cache=cache, position_ids=positions).logits)
    return torch.cat(logits, 1)[0].log_softmax(-1), prefill_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--score", type=int, default=512)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = {"smollm2": load_smollm2, "gemma3": load_gemma3_270m}[args.model]()
    book = tokenizer((TEXT_DIR / "emma.txt").read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    start_token = tokenizer.convert_tokens_to_ids(DOCUMENT_START[args.model])
    offsets = [5000 + 50000 * k for k in range(args.windows)]
    windows = [torch.tensor([[start_token, *book[offset : offset + args.context - 1]]]) for offset in offsets]
    totals = {
        name: dict(nll=0.0, kl=0.0, ratio=0.0, prefill=0.0, scoring=0.0) for name in ["DynamicCache", *args.configs]
    }
    for ids in windows:
        targets = ids[0, -args.score :]
        reference, ref_prefill, ref_scoring = run(model, ids, DynamicCache(config=model.config), args.score)
        totals["DynamicCache"]["nll"] -= reference.gather(-1, targets[:, None]).sum().item()
        totals["DynamicCache"]["prefill"] += ref_prefill
        totals["DynamicCache"]["scoring"] += ref_scoring
        for name in args.configs:
            cache = NexusQuantCache(NexusQuantConfig(**{**WINDOW, **CONFIGS[name]}), model=model)
            logprobs, prefill, scoring = run(model, ids, cache, args.score)
            total = totals[name]
            total["nll"] -= logprobs.gather(-1, targets[:, None]).sum().item()
            total["kl"] += (reference.exp() * (reference - logprobs)).sum(-1).sum().item()
            total["ratio"] += cache.stats()["ratio"] / len(windows)
            total["prefill"] += prefill
            total["scoring"] += scoring
    count = len(windows) * args.score
    base = totals["DynamicCache"]
    print("| method | ratio vs 16-bit | perplexity | change | KL (nats) | prefill time | scoring time |")
    print("|---|---|---|---|---|---|---|")
    for name, total in totals.items():
        record = dict(
            model=args.model,
            method=name,
            windows=len(windows),
            context=args.context,
            scored=args.score,
            ratio=total["ratio"] or 1.0,
            ppl=math.exp(total["nll"] / count),
            ppl_change=math.exp((total["nll"] - base["nll"]) / count) - 1,
            kl=total["kl"] / count,
            prefill_vs_dynamic=total["prefill"] / base["prefill"],
            scoring_vs_dynamic=total["scoring"] / base["scoring"],
        )
        print(json.dumps(record), flush=True)
        print(
            f"| {name} | {record['ratio']:.2f}x | {record['ppl']:.2f} | {100 * record['ppl_change']:+.2f}% | "
            f"{record['kl']:.4f} | {record['prefill_vs_dynamic']:.2f}x | {record['scoring_vs_dynamic']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
