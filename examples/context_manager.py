"""Compress every generate call in a block, then get the model back exactly as it was.

python examples/context_manager.py
"""

import torch

from nexusquant_cache import nexusquant_evict
from nexusquant_cache.models import load_smollm2

torch.set_num_threads(2)
model, tokenizer = load_smollm2()
ids = tokenizer("Miss Woodhouse was the youngest of the two daughters of", return_tensors="pt").input_ids

with nexusquant_evict(model, key_bits=4, value_bits=2, keep_ratio=0.5, recent_window=8, block_size=8):
    out = model.generate(ids, max_new_tokens=40, do_sample=False)  # a fresh NexusQuantCache per call
print(tokenizer.decode(out[0]))

out = model.generate(ids, max_new_tokens=40, do_sample=False)  # outside: transformers' own cache again
print(tokenizer.decode(out[0]))
