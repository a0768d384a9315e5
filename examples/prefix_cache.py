"""Prefill a long document once, save its compressed cache, then answer questions from the file.

Each question loads the saved prefix (milliseconds) instead of prefilling the document again,
and checks that the question really continues that document (the prompt hash). The document is
the start of Python's language reference (it ships with every Python; `--text` takes your own
file). SmolLM2-135M is a small model: its answers are rough, the mechanics are the point.

    python examples/prefix_cache.py                      # preset "max", about 1 minute on 2 CPU cores
    python examples/prefix_cache.py --preset lossless --tokens 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, prefill
from nexusquant_cache.config import PRESETS
from nexusquant_cache.eval import builtin_texts
from nexusquant_cache.models import load_smollm2

QUESTIONS = [
    "Which exception does a failing assert statement raise?",
    "What does an assignment statement do?",
    "When does the compiler emit no code for an assert statement?",
]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's language reference)")
    parser.add_argument("--tokens", type=int, default=3000, help="document length in tokens")
    parser.add_argument("--preset", default="max", choices=list(PRESETS))
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    text = args.text.read_text(encoding="utf-8") if args.text else builtin_texts("python-docs")[0][1]
    # SmolLM2 is a chat model: the document opens the user's turn, each question closes it.
    opening = tokenizer("<|im_start|>user\nRead this passage.\n\n", add_special_tokens=False).input_ids
    passage = tokenizer(text, add_special_tokens=False).input_ids
    document = torch.tensor([opening + passage[: args.tokens - len(opening)]])
    path = Path(tempfile.mkdtemp()) / "document.nqc"

    cache = NexusQuantCache(NexusQuantConfig.preset(args.preset), model=model)
    began = time.perf_counter()
    prefill(model, document, cache)
    cache.save(path, prompt_ids=document)
    stats = cache.stats()
    print(f"prefilled and saved {document.shape[1]} tokens in {time.perf_counter() - began:.1f} s")
    print(
        f"file {path.stat().st_size:,} bytes; a 16-bit cache would hold {stats['baseline_bytes']:,} "
        f"({stats['ratio']:.1f}x more)\n"
    )
    for question in QUESTIONS:
        turn = f"\n\nAnswer in one sentence: {question}<|im_end|>\n<|im_start|>assistant\n"
        asked = tokenizer(turn, add_special_tokens=False, return_tensors="pt")
        ids = torch.cat([document, asked.input_ids], dim=1)
        began = time.perf_counter()
        loaded = NexusQuantCache.load(path, model=model, prompt_ids=ids)  # refuses another document
        load = time.perf_counter() - began
        out = model.generate(ids, cache=loaded, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().split("\n")[0]
        print(f"Q: {question}\nA: {answer}")
        print(f"   (load {1000 * load:.0f} ms, load + answer {time.perf_counter() - began:.1f} s)\n")


if __name__ == "__main__":
    main()
