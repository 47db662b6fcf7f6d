#!/usr/bin/env bash
# GPU check of the merge kernels, in one run on a CUDA machine (no network needed).
#
#   bash benchmarks/gpu_check.sh                  # all three steps, benchmark up to 128K tokens
#   MAX_LEN=65536 bash benchmarks/gpu_check.sh     # a shorter benchmark
#   HALF_BENCH=1 bash benchmarks/gpu_check.sh      # also benchmark in bfloat16
#
# Each step has a time limit; the whole script stays under 10 minutes (typically a few).
# 1. tests/test_kernels.py with the kernels on CUDA (the loop references stay on the CPU);
# 2. benchmarks/device_compare.py: CUDA float32/float16/bfloat16 against the CPU in float32;
# 3. benchmarks/kernels.py --device cuda in float32, L = 2K ... MAX_LEN (upstream skipped where
#    its similarity matrix would not fit).
#
# Needs torch with CUDA and pytest. Without kvpress (or transformers, pandas, matplotlib) it
# still runs: mergepress/__init__ imports the presses, so the kernels module is then put on the
# path alone, the upstream baseline is skipped and no figure is drawn. Outputs go to
# results/benchmarks/ and figures/, and are copied to $OUT when it is set. Exit status: the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
MAX_LEN=${MAX_LEN:-131072}
PY=${PYTHON:-python}
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONDONTWRITEBYTECODE=1
REPO=$PWD
RUN_DIR=$REPO  # where the steps run: its mergepress package is the one imported
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(), \
f'{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB')" || exit 1
if ! $PY -c "import mergepress.kernels" 2>/dev/null; then
    echo "mergepress's presses cannot be imported here: using mergepress/kernels.py alone"
    SHIM=$(mktemp -d)
    mkdir "$SHIM/mergepress" && touch "$SHIM/mergepress/__init__.py"
    ln -s "$REPO/mergepress/kernels.py" "$SHIM/mergepress/kernels.py"
    RUN_DIR=$SHIM
    export PYTHONPATH="$SHIM"
fi

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    (cd "$RUN_DIR" && timeout "$limit" "$@")
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

# --noconftest: tests/conftest.py builds models with transformers; the kernel tests need none of it.
step "kernel tests on CUDA" 180 env MERGEPRESS_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider --noconftest \
    "$REPO/tests/test_kernels.py"
step "CUDA vs CPU float32" 120 $PY "$REPO/benchmarks/device_compare.py" --device cuda
lengths=""
for ((L = 2048; L <= MAX_LEN; L *= 2)); do lengths="$lengths $L"; done
# shellcheck disable=SC2086
step "benchmark float32" 270 $PY "$REPO/benchmarks/kernels.py" --device cuda --lengths $lengths --loop-max-len "$MAX_LEN"
if [ -n "${HALF_BENCH:-}" ]; then  # optional: the benchmark again in bfloat16
    # shellcheck disable=SC2086
    step "benchmark bfloat16" 270 $PY "$REPO/benchmarks/kernels.py" --device cuda --dtype bfloat16 --lengths $lengths
fi

if [ -n "${OUT:-}" ]; then
    cp results/benchmarks/kernels_cuda*.csv figures/kernel_benchmark_cuda*.png "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: $failed step(s) failed"
exit "$failed"
