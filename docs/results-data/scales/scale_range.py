"""The span of 8-bit log scales on Gemma-3-270m after 1,024 tokens of Python's documentation
(docs/results.md, "8-bit scales"): per layer and side, the page's octave, the share of scales
that fell to zero (off the 16 octaves held) and the log2 range of the rest.

    python docs/results-data/scales/scale_range.py > docs/results-data/scales/scale_range.txt
"""

import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval import builtin_texts
from nexusquant_cache.models import load_model

torch.set_num_threads(2)
model, tokenizer = load_model("gemma3")
ids = tokenizer(builtin_texts("python-docs")[0][1][:12000], return_tensors="pt").input_ids[:, :1024]
config = NexusQuantConfig(key_bits=4, value_bits=2, recent_window=32, block_size=32, scale_bits=8)
cache = NexusQuantCache(config, model=model)
with torch.no_grad():
    model(ids, cache=cache)
widest = 0.0
for index, layer in enumerate(cache.layers):
    layer.settle()
    for side, stream in (("keys", layer.key_stream), ("values", layer.value_stream)):
        old = stream.old
        if old is None or isinstance(old, torch.Tensor):
            continue
        values = old.scale_values()
        logs = torch.log2(values[values > 0])
        widest = max(widest, float(logs.max() - logs.min()))
        print(
            f"layer {index:2d} {side:6s} octave {old.octave:3d}  zero {float((old.scales == 0).float().mean()):.4f}  "
            f"log2 {float(logs.min()):5.1f} .. {float(logs.max()):4.1f}"
        )
print(f"widest span within one layer's keys or values: {widest:.1f} octaves")
