"""Generate from a long prompt through a NexusQuantCache and see what it holds.

python examples/generate_with_cache.py
"""

import torch

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval import DEFAULT_TEXT_DIR
from nexusquant_cache.models import load_smollm2

torch.set_num_threads(2)
model, tokenizer = load_smollm2()
text = (DEFAULT_TEXT_DIR / "emma.txt").read_text(encoding="utf-8")
ids = tokenizer(text[20_000:], return_tensors="pt").input_ids[:, :2048]

cache = NexusQuantCache(NexusQuantConfig.preset("balanced"), model=model)  # K4V4, keep half the tokens
out = model.generate(ids, cache=cache, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1] :]))

stats = cache.stats()
print(f"{stats['tokens_seen']} tokens seen, {stats['tokens_stored']} stored per layer")
print(f"{stats['bytes']['total']:,} bytes held ({stats['ratio']:.1f}x less than a 16-bit cache):", stats["bytes"])
