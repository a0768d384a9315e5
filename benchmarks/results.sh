#!/usr/bin/env bash
# Regenerates every number and plot of docs/results.md (about 4 hours on 2 CPU cores).
#
#   bash benchmarks/results.sh [OUT]        # OUT defaults to results-out/
#
# Needs the README's test setup (the `peers` extra, the two real models) and, for the kvpress
# cross-check, its own virtual environment (see benchmarks/kvpress_crosscheck.py); set
# KVPRESS_PYTHON to its python, or the cross-check is skipped. Each run writes OUT/NAME.out (the
# table, with one JSON line per method) and OUT/NAME.err (progress); results_plot.py draws the
# Pareto plots from them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:-results-out}" && cd "${1:-results-out}" && pwd)"
cd "$here"

run() {
    local name=$1
    shift
    echo "$(date +%T) $name" >&2
    "$@" >"$out/$name.out" 2>"$out/$name.err"
}

# SmolLM2-135M, 4k context, 8 Emma windows: ours at every operating point, then the peers.
run smol4k-ours python cache_quality.py --windows 8 --context 4096 --score 512 --configs \
    K4V4 K4V3 K4V2 K3V3 "K4V4 keep 0.5" "K4V3 keep 0.5" "K4V2 keep 0.5" "K3V2 keep 0.5" \
    "K4V4 keep 0.25" "K4V2 keep 0.25" "16-bit keep 0.5" "K4V2 keep 0.5 merge values"
run smol4k-peers python cache_quality.py --windows 8 --context 4096 --score 512 --configs \
    "16-bit keep 0.25" "16-bit keep 0.5 h2o" "16-bit keep 0.5 keynorm" "16-bit keep 0.5 streaming" \
    quanto:4 quanto:2 hqq:4 hqq:2 "K4V2 keep 0.125"
# The simple combinations at equal bytes: the same rotation, scale, packing and eviction with a
# scalar (Lloyd-Max) quantizer in place of E8.
run smol4k-scalar python cache_quality.py --windows 8 --context 4096 --score 512 --configs \
    "K3V2 keep 0.5 scalar" "K4V2 keep 0.25 scalar"
if [[ -n "${KVPRESS_PYTHON:-}" ]]; then
    run kvpress "$KVPRESS_PYTHON" kvpress_crosscheck.py --windows 8 --context 4096 --score 512
fi
# Copy recall and pass keys at 4k (the Austen novels as haystack).
window=recent_window=32,block_size=32
run recall4k python -m nexusquant_cache.eval --model smollm2 --context 4096 --text ../../shared/data/austen \
    --metrics copy_recall passkey \
    --copy-depths 0.1 0.5 0.9 --copy-spans 16 64 --passkey-depths 0.1 0.5 0.9 --passkey-trials 2 --threads 2 \
    --methods dynamic "nq:key_bits=4,value_bits=2,$window@K4V2" "nq:preset=balanced@balanced" \
    "nq:key_bits=4,value_bits=2,keep_ratio=0.5,$window@K4V2 keep 0.5" \
    "nq:key_bits=16,value_bits=16,keep_ratio=0.5,$window@16-bit keep 0.5 snapkv" quanto:4 \
    -o "$out/recall4k" --no-plots
# Gemma-3-270m, 2k/4k/8k context, 8 windows (keys centred: its global layers' keys carry large offsets).
run gemma4k python cache_quality.py --model gemma3 --windows 8 --context 4096 --score 512 --configs \
    "K4V4 centred" "K4V2 centred" "K4V4 keep 0.5 centred" "K4V2 keep 0.5 centred" "16-bit keep 0.5"
run gemma2k python cache_quality.py --model gemma3 --windows 8 --context 2048 --score 512 --configs \
    "K4V4 centred" "K4V2 keep 0.5 centred" "16-bit keep 0.5"
run gemma8k python cache_quality.py --model gemma3 --windows 8 --context 8192 --score 512 --configs \
    "K4V2 keep 0.5 centred"
# SmolLM2 at 2k and 8k.
run smol2k python cache_quality.py --windows 8 --context 2048 --score 512 --configs \
    K4V4 "K4V4 keep 0.5" "K4V2 keep 0.25" "16-bit keep 0.5" hqq:4
run smol8k python cache_quality.py --windows 8 --context 8192 --score 512 --configs K4V4 "K4V2 keep 0.25"
# Speed and peak memory at 4k: every figure of speed in README.md and docs/ comes from this run
# (one window of the built-in python-docs text; times are ratios to DynamicCache in the same run).
run eff4k python -m nexusquant_cache.eval --model smollm2 --context 4096 --metrics speed memory --prefill-chunk 512 \
    --threads 2 --methods dynamic nq:preset=lossless nq:preset=compact nq:preset=balanced nq:preset=max \
    quanto:4 hqq:4 -o "$out/eff4k" --no-plots

python results_plot.py "$out" --to ../docs
