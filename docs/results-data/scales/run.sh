#!/bin/sh
# 8-bit scales against bfloat16 ones on the three real models (docs/results.md, "8-bit scales"); run from
# a clone, about 1 hour on 2 cores.
# Run before the presets 8x and 16x took scale_bits=8 (they were then "nq:preset=8x@8x nq:preset=8x,scale_bits=8@8x-s8"):
# the same methods, spelled for today's presets.
W=recent_window=32,block_size=32
M="dynamic nq:key_bits=4,value_bits=2,$W@K4V2 nq:key_bits=4,value_bits=2,scale_bits=8,$W@K4V2-s8 nq:preset=8x,scale_bits=16@8x nq:preset=8x@8x-s8 nq:preset=16x,scale_bits=16@16x nq:preset=16x@16x-s8"
run() { python -m nexusquant_cache eval --context 2048 --windows 4 --score 256 --metrics perplexity --threads 1 --no-plots --quiet "$@" --methods $M; }
run --model smollm2 --text python-docs -o scales/smollm2-prose
run --model smollm2 --text python-code -o scales/smollm2-code
run --model qwen2.5-coder-0.5b --text python-code -o scales/qwen-code
run --model gemma3 --text python-docs -o scales/gemma-prose
run --model qwen2.5-coder-0.5b --text python-docs -o scales/qwen-prose
