"""Name the cache instead of building it: `cache_implementation="nexusquant"`.

`import nexusquant_cache` registers the name with transformers; `cache_config` takes any
NexusQuantConfig field. It works in `model.generation_config` too, so a saved model can carry it.

    python examples/cache_implementation.py
"""

import torch

import nexusquant_cache  # noqa: F401  (registers cache_implementation="nexusquant")
from nexusquant_cache.models import load_smollm2

torch.set_num_threads(2)
model, tokenizer = load_smollm2()
ids = tokenizer("The three most important things in a long novel are", return_tensors="pt").input_ids

out = model.generate(
    ids,
    cache_implementation="nexusquant",
    cache_config={"key_bits": 4, "value_bits": 2, "recent_window": 8, "block_size": 8},
    max_new_tokens=40,
    do_sample=False,
)
print(tokenizer.decode(out[0]))

model.generation_config.cache_implementation = "nexusquant"  # every later generate uses it
model.generation_config.cache_config = {"key_bits": 4, "value_bits": 4}
print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
