#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of at most 8 minutes (device tool: carry nothing, the
# synthetic checkpoints are generated on the spot). Writes its records and page under ${OUT:-gpu-out}.
#   1. the streamed pipeline on CUDA equals the in-memory one on a tiny LLaMA (same plan, same tensors);
#   2. the same compression alone and as a world of one under torchrun (NCCL): same plan and artifact;
#   3. the LLaMA-2-7B shape with 2 and 4 blocks in bf16, uniform and zerosum: peak device memory, host
#      RSS and wall time per block (benchmarks/scale.py gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device machine reaches no registry: run from the tree
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
python benchmarks/scale.py --check-cuda-equivalence 2>&1 | tee "$out/equivalence.txt"
python benchmarks/scale.py --check-nccl 2>&1 | tee "$out/nccl.txt"
timeout 420 python benchmarks/scale.py gpu --results "$out/cells" --page "$out/RESULTS-gpu.md" --render \
    2>&1 | tee "$out/scale.txt"
