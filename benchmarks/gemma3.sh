#!/usr/bin/env bash
# Every Gemma 3 270M cell of benchmarks/RESULTS-gemma3.md, in the order they were run, then the page itself.
# Same protocol as smollm2.sh (WikiText-2 validation calibration 256 x 512, seed 0; first 100 WikiText-2 test
# windows, first 128 C4 validation windows). Gemma's tokenizer prepends BOS, which the perplexity code puts at
# the start of every window.
# Resumable; run it alone: two torch jobs on 2 cores slow each other 3-6x.
#
#   bash benchmarks/gemma3.sh     # SPECTRA / ARTIFACTS default to folders under ~/.cache/rankcut/bench
set -euo pipefail
cd "$(dirname "$0")/.."
export RANKCUT_DATA="${RANKCUT_DATA:-../shared/data}"
SPECTRA="${SPECTRA:-${XDG_CACHE_HOME:-$HOME/.cache}/rankcut/bench/spectra}"
ARTIFACTS="${ARTIFACTS:-${XDG_CACHE_HOME:-$HOME/.cache}/rankcut/bench/artifacts-gemma3}"
R=benchmarks/results/gemma3
MATRIX="python benchmarks/compress_matrix.py --model gemma3-270m --results $R --spectra-cache $SPECTRA"
COMPARE="--eval wikitext2:test:100 c4:validation:128 --calib wikitext2:validation --artifacts $ARTIFACTS"

# Dense row and uniform (PivGa) at keep 0.8.
$MATRIX --dense $COMPARE --allocators uniform --formats pivga --keeps 0.8
# zerosum, the best allocator at keep 0.8 on SmolLM2 (first-order, no training: minutes, not ARA's ten).
$MATRIX $COMPARE --allocators zerosum --formats pivga --keeps 0.8
# Uniform with plain factors at the same budget.
$MATRIX $COMPARE --allocators uniform --formats plain --keeps 0.8

# Headline (issue 21): dense, zerosum and uniform for reference at keep 0.8 over the full WikiText-2 test
# split, zero-shot on 500 items per task (all where a task has fewer), and speed as the median of 5
# interleaved dense/compressed rounds. Each cell gets only what it lacks (from its artifact, or compressed
# again and checked to give its stored plan).
HEAD="--eval wikitext2:test wikitext2:test:100 c4:validation:128 --zeroshot --zeroshot-limit 500 --speed --speed-rounds 5"
$MATRIX --dense $HEAD --calib wikitext2:validation --artifacts $ARTIFACTS --allocators uniform zerosum --formats pivga \
    --keeps 0.8

# The same commands streamed from the checkpoint folder (issue 17; the cells above were compressed through the
# Python API with the whole model loaded): same plan and perplexity as the cell, and the peak beside it (RESULTS-scale.md).
for A in uniform zerosum; do
    S=benchmarks/results/scale/cli-gemma3-270m-$A-pivga-keep0.8.json
    [ -f $S ] || python benchmarks/time_cli.py --out $S --artifact "$ARTIFACTS/cli-$A-pivga-keep0.8" \
        --cell $R/$A-pivga-cholesky-keep0.8-wikitext2.json -- --model gemma3-270m --keep 0.8 --allocator $A \
        --whitening cholesky --calib wikitext2 --calib-split validation --nsamples 256 --seqlen 512 --closed-loop none
done
python benchmarks/scale.py --render > /dev/null

# ZS-SVD's weight correction after zerosum (--closed-loop correct, one round), the best keep-0.8 pipeline on
# SmolLM2 (issue 19).
$MATRIX $COMPARE --allocators zerosum --formats pivga --keeps 0.8 --closed-loops correct
$MATRIX --eval wikitext2:test --calib wikitext2:validation --artifacts $ARTIFACTS --allocators zerosum --formats pivga \
    --keeps 0.8 --closed-loops correct
# The half-step correction, the default closed loop since (chosen on SmolLM2's keep 0.6).
$MATRIX $COMPARE --allocators zerosum --formats pivga --keeps 0.8 --closed-loops correct --correction-steps 0.5

python benchmarks/make_results.py --results $R --out benchmarks/RESULTS-gemma3.md --title "Gemma 3 270M" \
    --readme README.md --command "bash benchmarks/gemma3.sh"
