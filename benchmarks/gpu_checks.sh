#!/usr/bin/env bash
# Every GPU check the open work needs, in one run on a machine with one CUDA GPU (meant to fit
# one 10-minute call on an H100/H200; not yet timed on one), results under OUT (default
# benchmarks/results/gpu/checks):
#   1. the library's tests, which run on the GPU with the compiled kernel when it has one;
#   2. per synchronized call with the default guard, the headline GPU grid (K 8 and 64,
#      N 2^24 and 2^26, fp32 and bf16) against copy bandwidth;
#   3. a 7e9-parameter model's bf16 updates folded into an Accumulator (accumulator_gpu.py);
#   4. the cohort engine's targets, both engines side by side (cohort_gpu.py);
#   5. where a synchronized call's host time goes, piece by piece (host_breakdown_gpu.py).
# Each step runs even if an earlier one failed; the exit status is the first failure's.
#
#     pip install -e . --no-deps --no-build-isolation && bash benchmarks/gpu_checks.sh OUT
set -uo pipefail
out="${1:-benchmarks/results/gpu/checks}"
mkdir -p "$out"
status=0
run() {  # run NAME COMMAND...: log to OUT/NAME.log, remember the first failure
    local name="$1"; shift
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$out/$name.log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
run cuda-tests python -m pytest -q -p no:cacheprovider tests/gma_kernels
run grid python -m pytest benchmarks/test_aggregation.py --benchmark-only -q -p no:cacheprovider \
    --bench-device cuda --bench-k 8,64 --bench-n 24,26 --bench-dtype fp32,bf16 \
    --benchmark-json="$out/gpu-targets.json"
run grid-report python benchmarks/report.py "$out/gpu-targets.json" -o "$out/gpu-targets.md"
run accumulator python benchmarks/accumulator_gpu.py --device cuda --out "$out/accumulator.json"
run cohort python benchmarks/cohort_gpu.py --device cuda --out "$out/cohort.json"
run host python benchmarks/host_breakdown_gpu.py --out "$out/host-breakdown.json"
exit "$status"
