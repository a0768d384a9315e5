"""Name the cache instead of building it: `cache_implementation="nexusquant"`.

`import nexusquant_cache` registers the name with transformers (without that import transformers
rejects it as an unknown cache implementation); `cache_config` takes a preset's settings or any
NexusQuantConfig field. It works in `model.generation_config` too, so a saved model can carry it.

    python examples/cache_implementation.py         # about 1 minute on 2 CPU cores
"""

import nexusquant_cache  # noqa: F401  (registers cache_implementation="nexusquant")
from nexusquant_cache import NexusQuantConfig
from nexusquant_cache.eval import builtin_texts
from nexusquant_cache.models import load_smollm2

model, tokenizer = load_smollm2()
text = builtin_texts("python-docs")[0][1]
ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]

out = model.generate(
    ids,
    cache_implementation="nexusquant",
    cache_config=NexusQuantConfig.preset("compact").to_dict(),  # K4V2, every token kept
    max_new_tokens=30,
    do_sample=False,
)
print(tokenizer.decode(out[0, ids.shape[1] :]))

model.generation_config.cache_implementation = "nexusquant"  # every later generate uses it
model.generation_config.cache_config = {"key_bits": 4, "value_bits": 4}
print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]))
