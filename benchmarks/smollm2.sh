#!/usr/bin/env bash
# Every SmolLM2-135M cell of benchmarks/RESULTS.md, in the order they were run, then the page itself.
# Resumable: compress_matrix.py skips cells whose JSON holds every requested evaluation, so rerunning
# this script only does what is missing. Run it alone: two torch jobs on 2 cores slow each other 3-6x.
#
#   bash benchmarks/smollm2.sh     # SPECTRA / ARTIFACTS default to folders under ~/.cache/rankcut/bench
set -euo pipefail
cd "$(dirname "$0")/.."
export RANKCUT_DATA="${RANKCUT_DATA:-../shared/data}"
SPECTRA="${SPECTRA:-${XDG_CACHE_HOME:-$HOME/.cache}/rankcut/bench/spectra}"     # whitened spectra, shared by cells with one calibration
ARTIFACTS="${ARTIFACTS:-${XDG_CACHE_HOME:-$HOME/.cache}/rankcut/bench/artifacts}" # saved models, to add evaluations to a cell later
R=benchmarks/results/smollm2
MATRIX="python benchmarks/compress_matrix.py --model smollm2-135m --results $R --spectra-cache $SPECTRA"
EVAL="wikitext2:test c4:validation:128"

# Dense row; uniform with plain factors and PivGa (WikiText-2 calibration); plain SVD on 100 windows.
$MATRIX --dense --eval wikitext2:test --allocators uniform --formats plain pivga --keeps 0.8 0.6 \
    --calib wikitext2:validation --artifacts "$ARTIFACTS"
$MATRIX --eval wikitext2:test:100 --whitenings none --allocators uniform --formats plain --keeps 0.8 \
    --calib wikitext2:validation
# Fresh-process reload and plain -> PivGa conversion of the keep-0.8 plain artifact.
python benchmarks/verify_artifact.py "$ARTIFACTS/uniform-plain-cholesky-keep0.8-wikitext2" --convert-windows 100 \
    --out $R/verify-uniform-plain-cholesky-keep0.8-wikitext2.json
# Learned allocators at default settings, PivGa, WikiText-2 calibration.
$MATRIX --eval $EVAL --allocators ara fermigrad --formats pivga --keeps 0.8 0.6 --calib wikitext2:validation \
    --artifacts "$ARTIFACTS"
# C4 calibration (uniform, plain, keep 0.8) against the dense model on the first 100 test windows.
$MATRIX --dense --eval wikitext2:test:100 c4:validation:128 --allocators uniform --formats plain --keeps 0.8 \
    --calib c4:validation
# The cells below are evaluated on the first 100 WikiText-2 test windows (2.5 min instead of 15 per model);
# the rows above get that figure too (from their artifacts), so every row has a comparable one.
W100="--eval wikitext2:test:100 --formats pivga --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX $W100 --allocators uniform --keeps 0.8 0.6
$MATRIX $W100 --allocators ara --keeps 0.8
# ARA ablation at keep 0.8 (default: guidance G2, median binarization, dense flow on).
for variant in 'guidance-none {"guidance": "none"}' 'guidance-G1 {"guidance": "G1"}' \
               'binarize-argmax {"binarize": "argmax"}' 'no-dense-flow {"dense_flow": false}'; do
    $MATRIX $W100 --allocators ara --keeps 0.8 --tag="-${variant%% *}" --allocator-options "{\"ara\": ${variant#* }}"
done
# With plain factors modules reach the dense regime well below full rank (k(m+n) >= mn), where the dense
# flow and G2 guidance act; with PivGa only at full rank. So those two are ablated on plain factors too.
PLAIN="--eval wikitext2:test:100 --formats plain --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX $PLAIN --allocators uniform ara --keeps 0.8
$MATRIX $PLAIN --allocators ara --keeps 0.8 --tag=-no-dense-flow --allocator-options '{"ara": {"dense_flow": false}}'
$MATRIX $PLAIN --allocators ara --keeps 0.8 --tag=-guidance-none --allocator-options '{"ara": {"guidance": "none"}}'
# ARA's own setting: C4 calibration, for uniform, ARA and FermiGrad at keep 0.8.
$MATRIX --eval wikitext2:test:100 c4:validation:128 --allocators uniform ara fermigrad --formats pivga --keeps 0.8 \
    --calib c4:validation --artifacts "$ARTIFACTS"
# Every allocator at both budgets (PivGa, WikiText-2 calibration) on the same evaluations: first 100
# WikiText-2 test windows, first 128 C4 validation windows, zero-shot on the first 25 items of each task,
# speed against the dense model. Cells made above only get what they lack, from their artifacts.
COMPARE="--eval wikitext2:test:100 c4:validation:128 --zeroshot --zeroshot-limit 25 --speed --formats pivga"
COMPARE="$COMPARE --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX --dense $COMPARE --allocators uniform ara fermigrad zerosum strs dobi energy --keeps 0.8 0.6
# The same with plain factors. Cells made above (uniform at both keeps, ARA at 0.8) only get what they lack;
# uniform at 0.6 had no saved artifact, so it is compressed again and checked to give its stored plan.
$MATRIX ${COMPARE/--formats pivga/--formats plain} --allocators ara uniform --keeps 0.8
$MATRIX ${COMPARE/--formats pivga/--formats plain} --allocators zerosum energy --keeps 0.8 0.6
$MATRIX ${COMPARE/--formats pivga/--formats plain} --allocators uniform energy ara --keeps 0.6
$MATRIX ${COMPARE/--formats pivga/--formats plain} --allocators fermigrad dobi strs --keeps 0.8 0.6

# Closed-loop factorization (issue 19): for uniform and zerosum at both budgets, today's sequential
# re-collection, the error-compensating fit (whole, and half of the upstream error: --compensations 0.5),
# and the compensating fit with block refinement (32 and 128 Adam steps per block: one and four passes
# over the 32 calibration batches). The open-loop cells are the ones above; each closed-loop cell
# allocates on the same (cached) open-loop spectra.
LOOP="--eval wikitext2:test:100 c4:validation:128 --formats pivga --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX $LOOP --allocators uniform --keeps 0.8 --closed-loops compensate sequential
$MATRIX $LOOP --allocators uniform --keeps 0.8 --closed-loops compensate --refine-steps 32
# The anchored compensating fit (--anchor 1: the dense fit on the dense inputs, equally weighted), which
# keeps the weights the full compensating fit inflates along directions the compressed inputs lost.
$MATRIX $LOOP --allocators uniform zerosum --keeps 0.8 --closed-loops compensate --anchors 1
# The anchored fit at keep 0.6, where the open-loop error is largest: after ARA (issue 18's training, the
# best open-loop plan at 0.6), zerosum and uniform.
$MATRIX $LOOP --allocators ara --keeps 0.6 --closed-loops compensate --anchors 1 --tag=-epoch1-lr0.15 \
    --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
$MATRIX $LOOP --allocators zerosum uniform --keeps 0.6 --closed-loops compensate --anchors 1
# Issue 18's training for the learned allocators (one epoch over the calibration windows, whole windows,
# decayed steps, read out from averaged parameters), tagged -epoch1 beside the cells of the old training.
EPOCH="--eval wikitext2:test:100 c4:validation:128 --formats pivga --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX $EPOCH --allocators fermigrad --keeps 0.8 --tag=-epoch1 --allocator-options '{"fermigrad": {"epochs": 1, "lr": 2.0}}'
$MATRIX $EPOCH --allocators ara --keeps 0.6 --tag=-epoch1 --allocator-options '{"ara": {"epochs": 1, "lr": 0.05}}'
# ARA's lr 0.05 (the default then) stopped short; 0.15, chosen on C4 validation, is the default since.
$MATRIX $EPOCH --allocators ara --keeps 0.6 0.8 --tag=-epoch1-lr0.15 --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
# FermiGrad's lr 2 (the default then, as dobi's) stopped short too; 6, chosen on C4 validation, is its default since.
$MATRIX $EPOCH --allocators fermigrad --keeps 0.8 0.6 --tag=-epoch1-lr6 --allocator-options '{"fermigrad": {"epochs": 1, "lr": 6.0}}'

# Headline (issue 21): dense, the best pipeline per keep ratio and uniform for reference over the full
# WikiText-2 test split, zero-shot on 500 items per task (all where a task has fewer), and speed as the
# median of 5 interleaved dense/compressed rounds. Each cell gets only what it lacks, from its artifact.
HEAD="--eval wikitext2:test wikitext2:test:100 c4:validation:128 --zeroshot --zeroshot-limit 500 --speed --speed-rounds 5"
HEAD="$HEAD --formats pivga --calib wikitext2:validation --artifacts $ARTIFACTS"
$MATRIX --dense $HEAD --allocators uniform zerosum --keeps 0.8
$MATRIX $HEAD --allocators zerosum --keeps 0.8 --closed-loops compensate --anchors 1
$MATRIX $HEAD --allocators uniform --keeps 0.6
$MATRIX $HEAD --allocators ara --keeps 0.6 0.8 --tag=-epoch1-lr0.15 --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'

# The compression core's command as a user runs it, timed end to end in a fresh process (model load,
# calibration, decomposition, save), then the artifact's perplexity on the first 100 test windows.
[ -f $R/cli-uniform-pivga-keep0.8.json ] || python benchmarks/time_cli.py --out $R/cli-uniform-pivga-keep0.8.json \
    --artifact "$ARTIFACTS/cli-uniform-pivga-keep0.8" -- --model smollm2-135m --keep 0.8 --allocator uniform \
    --whitening cholesky --calib wikitext2 --calib-split validation --nsamples 256 --seqlen 512 --closed-loop none
# The same command streamed from the checkpoint folder (issue 17; the cells were compressed with the whole model
# loaded, most before streaming): same plan and perplexity as the cell, and the peak beside it (RESULTS-scale.md).
for A in uniform zerosum; do
    S=benchmarks/results/scale/cli-smollm2-135m-$A-pivga-keep0.8.json
    [ -f $S ] || python benchmarks/time_cli.py --out $S --artifact "$ARTIFACTS/cli-$A-pivga-keep0.8" \
        --cell $R/$A-pivga-cholesky-keep0.8-wikitext2.json -- --model smollm2-135m --keep 0.8 --allocator $A \
        --whitening cholesky --calib wikitext2 --calib-split validation --nsamples 256 --seqlen 512 --closed-loop none
done
python benchmarks/scale.py --render > /dev/null

# Dobi with issue 18's training (one epoch, lr 2 as before: not tuned), beside its 150-step cells.
$MATRIX $EPOCH --allocators dobi --keeps 0.8 0.6 --tag=-epoch1-lr2 --allocator-options '{"dobi": {"epochs": 1, "lr": 2.0}}'
# Block refinement's lr and steps on one block of the zerosum keep-0.8 model (held-out: 32 C4 validation windows;
# resumes: runs already recorded are skipped).
python benchmarks/refine_tuning.py \
    "$ARTIFACTS/cli-zerosum-pivga-keep0.8" --blocks 4 --steps 32 128 --lrs 1e-4 1e-3 \
    --out $R/refine-tuning-zerosum-keep0.8.json
# ZS-SVD's weight correction (--closed-loop correct, one round) after zerosum's plan; the full test split at 0.8.
$MATRIX $LOOP --allocators zerosum --keeps 0.8 0.6 --closed-loops correct
$MATRIX ${LOOP/--eval/--eval wikitext2:test} --allocators zerosum --keeps 0.8 --closed-loops correct
# STRS's sensitivity set at four times the default tokens (8 x 256 against 2 x 256; ASVD: 32 x 2048).
$MATRIX $EPOCH --allocators strs --keeps 0.8 0.6 --tag=-w8-t256 --allocator-options '{"strs": {"windows": 8, "tokens": 256}}'
# A share of the correction's step (--correction-step; the full step overshoots at keep 0.6), one round and two
# half steps (ZS-SVD corrects over several stages); two full rounds at 0.8. Chosen on C4 validation.
$MATRIX $LOOP --allocators zerosum --keeps 0.6 --closed-loops correct --correction-steps 0.5 0.25
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops correct --correction-steps 0.5
$MATRIX $LOOP --allocators zerosum --keeps 0.6 --closed-loops correct --correction-rounds 2 --correction-steps 0.5
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops correct --correction-rounds 2
# The full test split of the half-step correction at keep 0.6 (zerosum's best row there), then ARA's plan (the
# best open-loop plan at 0.6) followed by it.
$MATRIX ${LOOP/--eval/--eval wikitext2:test} --allocators zerosum --keeps 0.6 --closed-loops correct --correction-steps 0.5
$MATRIX $LOOP --allocators ara --keeps 0.6 --closed-loops correct --correction-steps 0.5 --tag=-epoch1-lr0.15 \
    --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
# That plan differs from the -epoch1-lr0.15 cell's (152 of 210 ranks; ARA's training on another host and code):
# the same settings open loop again, for the correction's own gain; then the corrected cell's full split.
$MATRIX $LOOP --allocators ara --keeps 0.6 --tag=-epoch1-lr0.15-again --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
$MATRIX ${LOOP/--eval/--eval wikitext2:test} --allocators ara --keeps 0.6 --closed-loops correct --correction-steps 0.5 \
    --tag=-epoch1-lr0.15 --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
# The headline's figures for zerosum + correct with half steps, the default pipeline since.
$MATRIX $HEAD --allocators zerosum --keeps 0.8 --closed-loops correct --correction-steps 0.5

# Block refinement (32 steps) after the half-step correction, at keep 0.8 after zerosum and at keep 0.6 after ARA's
# plan; and after zerosum's unanchored compensating fit at keep 0.8.
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops compensate --refine-steps 32
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops correct --correction-steps 0.5 --refine-steps 32
$MATRIX $LOOP --allocators ara --keeps 0.6 --closed-loops correct --correction-steps 0.5 --refine-steps 32 \
    --tag=-epoch1-lr0.15 --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'

# The headline's zero-shot and speed of the best keep-0.6 pipeline, ARA + the half-step correction.
$MATRIX $HEAD --allocators ara --keeps 0.6 --closed-loops correct --correction-steps 0.5 --tag=-epoch1-lr0.15 \
    --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'

# The compensating fit at keep 0.6, unanchored (the fit of issue 19) and the anchored default after uniform, and
# the sequential refit.
$MATRIX $LOOP --allocators uniform zerosum --keeps 0.6 --closed-loops compensate sequential
$MATRIX $LOOP --allocators uniform --keeps 0.6 --closed-loops compensate --anchors 1
# The same two fits after zerosum at keep 0.8.
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops compensate sequential

# Refinement of the unanchored compensating fits at keep 0.6 (32 steps), and a second step count (8) after both
# allocators at both keep ratios.
$MATRIX $LOOP --allocators uniform zerosum --keeps 0.6 --closed-loops compensate --refine-steps 32
$MATRIX $LOOP --allocators uniform zerosum --keeps 0.8 0.6 --closed-loops compensate --refine-steps 8
# The correction's mean gradient over 128 windows (32 by default) on ARA's keep-0.6 plan.
$MATRIX $LOOP --allocators ara --keeps 0.6 --closed-loops correct --correction-steps 0.5 --correction-windows 128 \
    --tag=-epoch1-lr0.15 --allocator-options '{"ara": {"epochs": 1, "lr": 0.15}}'
# Refinement (32 steps) of the anchored compensating fit after zerosum at keep 0.8.
$MATRIX $LOOP --allocators zerosum --keeps 0.8 --closed-loops compensate --anchors 1 --refine-steps 32

# Closed-loop cells not measured yet (20-100 min each here); resuming the script runs them.
$MATRIX $LOOP --allocators uniform --keeps 0.8 --closed-loops compensate --compensations 0.5
$MATRIX $LOOP --allocators uniform zerosum --keeps 0.8 0.6 --closed-loops compensate --refine-steps 128

python benchmarks/make_results.py --results $R --out benchmarks/RESULTS.md --title SmolLM2-135M --readme README.md \
    --command "bash benchmarks/smollm2.sh"
