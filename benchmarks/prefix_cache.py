"""Prefix reuse from disk (SmolLM2-135M, 4,096 tokens of Emma): file size and time to first token.

For each configuration: prefill the document into a NexusQuantCache (512-token chunks), save it,
load it, and answer a question appended after the document (one forward of the question). The
alternative is re-running the prefill of document + question with a 16-bit DynamicCache; the
size reference is a safetensors file of that DynamicCache's keys and values in bfloat16. Run on
2 CPU threads:

    python benchmarks/prefix_cache.py [--text python-docs]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _austen import TEXT_HELP, read_book
from safetensors.torch import save_file
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, prefill
from nexusquant_cache.models import load_smollm2

CONFIGS = {"lossless": NexusQuantConfig.preset("lossless"), "max (K4V2 keep 0.25)": NexusQuantConfig.preset("max")}
QUESTION = "\n\nQuestion: Who is Emma's governess?\nAnswer:"


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", help=TEXT_HELP)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    book = tokenizer(read_book(args.text), add_special_tokens=False).input_ids
    document = torch.tensor([[tokenizer.convert_tokens_to_ids("<|endoftext|>"), *book[5000:9095]]])
    question = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
    full = torch.cat([document, question], dim=1)
    positions = torch.arange(document.shape[1], full.shape[1])[None]
    folder = Path(tempfile.mkdtemp())

    start = time.perf_counter()
    reference_token = model(full, logits_to_keep=1).logits[0, -1].argmax().item()
    rerun = time.perf_counter() - start
    dynamic = DynamicCache(config=model.config)
    model(document, cache=dynamic)
    save_file(
        {
            f"{i}.{part}": getattr(layer, part).bfloat16().contiguous()
            for i, layer in enumerate(dynamic.layers)
            for part in ("keys", "values")
        },
        folder / "dynamic.safetensors",
    )
    dynamic_bytes = (folder / "dynamic.safetensors").stat().st_size
    print(
        f"{document.shape[1]} document tokens + {question.shape[1]} question tokens; re-running the prefill "
        f"(DynamicCache) to the first answer token: {rerun:.2f} s; 16-bit cache file: {dynamic_bytes:,} bytes"
    )
    print()
    print(
        "| config | file bytes | vs 16-bit file | file / stats() | prefill (once) | compress + save | "
        "load | load + first token | vs re-running the prefill | first token as DynamicCache |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        path = folder / "emma.nqc"
        cache = NexusQuantCache(config, model=model)
        start = time.perf_counter()
        prefill(model, document, cache)
        filled = time.perf_counter() - start
        start = time.perf_counter()
        cache.save(path, prompt_ids=document)  # settles first: encodes the prompt's last chunk
        saved = time.perf_counter() - start
        size, held = path.stat().st_size, cache.stats()["bytes"]["total"]
        start = time.perf_counter()
        loaded = NexusQuantCache.load(path, model=model, prompt_ids=full)
        load = time.perf_counter() - start
        token = model(question, cache=loaded, position_ids=positions, logits_to_keep=1).logits[0, -1].argmax().item()
        first = time.perf_counter() - start
        print(
            f"| {name} | {size:,} | {dynamic_bytes / size:.2f}x smaller | {size / held:.4f} | {filled:.1f} s | "
            f"{saved:.1f} s | {1000 * load:.0f} ms | {first:.2f} s | {rerun / first:.1f}x faster | "
            f"{token == reference_token} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
