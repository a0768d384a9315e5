"""Evaluation of KV-cache compressors: methods, metrics, reports (``nexusquant-cache eval``).

    from nexusquant_cache.eval import run_eval
    results = run_eval(model, tokenizer, ["dynamic", "nq:preset=max", "quanto:2"], output_dir="out")

See docs/eval.md for what each metric measures exactly.
"""

from .data import (
    BUILTIN_TEXTS,
    COMMON_WORDS,
    DEFAULT_TEXT,
    builtin_texts,
    copy_prompt,
    passkey_prompt,
    read_texts,
    spread_windows,
)
from .efficiency import peak_memory, speed
from .methods import (
    DEFAULT_METHODS,
    Method,
    cache_bytes,
    dynamic,
    nexusquant,
    parse_method,
    quantized,
    tensor_bytes,
    unavailable_reason,
)
from .quality import copy_recall, passkey, perplexity_kl, tail_logits
from .report import load_results, markdown, plot, save_results
from .runner import METRICS, EvalResults, add_arguments, main, run_eval

__all__ = [
    "BUILTIN_TEXTS",
    "COMMON_WORDS",
    "DEFAULT_METHODS",
    "DEFAULT_TEXT",
    "METRICS",
    "EvalResults",
    "Method",
    "add_arguments",
    "builtin_texts",
    "cache_bytes",
    "copy_prompt",
    "copy_recall",
    "dynamic",
    "load_results",
    "main",
    "markdown",
    "nexusquant",
    "parse_method",
    "passkey",
    "passkey_prompt",
    "peak_memory",
    "perplexity_kl",
    "plot",
    "quantized",
    "read_texts",
    "run_eval",
    "save_results",
    "speed",
    "spread_windows",
    "tail_logits",
    "tensor_bytes",
    "unavailable_reason",
]
