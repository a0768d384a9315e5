"""Generate from a long prompt through a NexusQuantCache and see what it holds.

    python examples/generate_with_cache.py          # about 1 minute on 2 CPU cores

The prompt is 2,048 tokens of English prose that every Python installation has (the language
reference that `help()` shows), taken from its section on descriptors; put any text of your own
in its place. (Its very first 2,048 tokens would end inside a grammar table of operators, which
any model continues with more of the table.)
"""

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval import builtin_texts
from nexusquant_cache.models import load_smollm2

model, tokenizer = load_smollm2()
text = builtin_texts("python-docs")[0][1]
ids = tokenizer(text[20_000:], return_tensors="pt").input_ids[:, :2048]

cache = NexusQuantCache(NexusQuantConfig.preset("balanced"), model=model)  # K4V4, keep half the tokens
out = model.generate(ids, cache=cache, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1] :]))

stats = cache.stats()
print(f"{stats['tokens_seen']} tokens seen, {stats['tokens_stored']} stored per layer")
print(f"{stats['bytes']['total']:,} bytes held ({stats['ratio']:.1f}x less than a 16-bit cache):", stats["bytes"])
