"""Compress every generate call in a block, then get the model back exactly as it was.

    python examples/context_manager.py              # about 1 minute on 2 CPU cores
"""

from nexusquant_cache import NexusQuantConfig, nexusquant_evict
from nexusquant_cache.eval import builtin_texts
from nexusquant_cache.models import load_smollm2

model, tokenizer = load_smollm2()
text = builtin_texts("python-docs")[0][1]
ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]

with nexusquant_evict(model, NexusQuantConfig.preset("balanced")):
    out = model.generate(ids, max_new_tokens=30, do_sample=False)  # a fresh NexusQuantCache per call
print(tokenizer.decode(out[0, ids.shape[1] :]))

out = model.generate(ids, max_new_tokens=30, do_sample=False)  # outside: transformers' own cache again
print(tokenizer.decode(out[0, ids.shape[1] :]))
