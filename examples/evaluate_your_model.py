"""Evaluate KV-cache compressors on your own model and text.

    python examples/evaluate_your_model.py                          # SmolLM2 on prose: about 3 minutes on 2 CPU cores
    python examples/evaluate_your_model.py smollm2 python-code      # the same on Python source
    python examples/evaluate_your_model.py ./my-model my_book.txt   # any causal LM folder, any text

Compares the uncompressed DynamicCache, two NexusQuantCache presets, an eviction-only baseline
and transformers' quanto cache (reported as unavailable if optimum-quanto is not installed) on
perplexity/KL, copy recall and pass-key retrieval. Results go to ./eval-example/ (results.json,
results.md, a plot), rewritten after each metric, so an interrupted run keeps what finished.
"""

import sys

from nexusquant_cache.eval import nexusquant, run_eval
from nexusquant_cache.models import load_model

model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"  # or a folder with config.json + weights
text = sys.argv[2] if len(sys.argv) > 2 else "python-docs"  # or python-code, a text file, a folder of *.txt

model, tokenizer = load_model(model_name)
methods = [
    "dynamic",
    nexusquant(preset="compact"),  # K4V2, quantization only
    nexusquant(preset="max"),  # K4V2 keeping a quarter of the tokens
    # eviction only: StreamingLLM's sinks and most recent tokens, half of them, not quantized (held
    # in the model's dtype: in float32 that is more bytes than a 16-bit DynamicCache; docs/eval.md)
    nexusquant("StreamingLLM keep 0.5 (unquantized)", key_bits=16, value_bits=16, keep_ratio=0.5, scorer="streaming"),
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
