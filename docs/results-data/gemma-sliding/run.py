"""Gemma-3-270m at 4k: what its 15 sliding-window layers could give by holding fewer bits.

Issue 14 asks whether demoting the sliding layers would reach 6x at <= 2%. This run gives every
sliding layer 2-bit keys from the start (layer_overrides: the bound of demoting all of them,
without the tier mask), against `compact` and a 6x byte budget. Run from the repository root:
python docs/results-data/gemma-sliding/run.py (about 4 minutes on 2 CPU cores)."""

from nexusquant_cache.eval import nexusquant, run_eval
from nexusquant_cache.models import load_model

model, tokenizer = load_model("gemma3")
layer_types = model.config.get_text_config(decoder=True).layer_types
sliding = {i: {"key_bits": 2} for i, kind in enumerate(layer_types) if kind == "sliding_attention"}
window = dict(recent_window=32, block_size=32)
methods = [
    "dynamic",
    nexusquant("compact", preset="compact"),
    nexusquant("K4V2 target 6", key_bits=4, value_bits=2, target_ratio=6, **window),
    nexusquant("compact, sliding K2V2", preset="compact", layer_overrides=sliding),
    nexusquant(
        "K4V2 target 6, sliding K2V2", key_bits=4, value_bits=2, target_ratio=6, layer_overrides=sliding, **window
    ),
]
run_eval(
    model,
    tokenizer,
    methods,
    text="python-docs",
    context=4096,
    windows=4,
    score=256,
    metrics=("perplexity",),
    threads=2,
    output_dir="docs/results-data/gemma-sliding",
    model_name="gemma3",
    plots=False,
)
