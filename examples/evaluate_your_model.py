"""Evaluate KV-cache compressors on your own model and text.

    python examples/evaluate_your_model.py                              # SmolLM2-135M on Austen
    python examples/evaluate_your_model.py ./my-model my_book.txt       # any causal LM folder, any text

Compares the uncompressed DynamicCache, two NexusQuantCache settings, an eviction-only
baseline and transformers' quanto cache (reported as unavailable if optimum-quanto is not
installed) on perplexity/KL, copy recall and pass-key retrieval; sizes are small enough for a
laptop CPU in a few minutes. Results go to ./eval-example/ (results.json, results.md, a plot).
"""

import sys

import torch

from nexusquant_cache.eval import nexusquant, run_eval
from nexusquant_cache.models import load_model

torch.set_num_threads(2)
model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"  # or a folder with config.json + weights
text = sys.argv[2] if len(sys.argv) > 2 else None  # None: Jane Austen's novels (shared/data/austen)

model, tokenizer = load_model(model_name)
methods = [
    "dynamic",
    nexusquant(key_bits=4, value_bits=2, recent_window=32, block_size=32),  # quantization only
    nexusquant(preset="max"),  # K4V2 keeping a quarter of the tokens
    nexusquant(key_bits=16, value_bits=16, keep_ratio=0.5, scorer="streaming"),  # eviction only
    "quanto:4",  # transformers' QuantizedCache, an optional peer
]
results = run_eval(
    model,
    tokenizer,
    methods,
    text=text,
    metrics=["perplexity", "copy_recall", "passkey"],
    windows=8,  # spread through the text: never judge from one window
    context=1024,
    score=128,
    copy_depths=(0.25, 0.75),
    copy_spans=(32,),
    passkey_depths=(0.25, 0.75),
    passkey_trials=2,
    model_name=model_name,
    output_dir="eval-example",
)
print(results.markdown())
