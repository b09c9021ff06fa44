#!/usr/bin/env bash
# One command that confirms, on one NVIDIA GPU (H100/H200), every CUDA fix of issue 26 in
# under 5 minutes; results go to $OUT (default ./gpu-check). Run from anywhere:
#
#     OUT=/some/dir bash scripts/gpu_check.sh
#
# (GPU_CHECK_DEVICE=cpu runs the same steps without a GPU -- CUDA tests skip -- to check
# the script itself; that proves nothing about the GPU.)
#
# Needs the CUDA build of torch and this checkout's dependencies; no network. Exit status 0
# only when every step passed. Steps (each bounded by `timeout`):
#   1. the issue's tests, CPU-provable (delayed-copy device) and CUDA-marked, in their files;
#   2. every CUDA-marked test of the repository (skips are listed in summary.txt);
#   3. `kvstore calibrate --quick` on the GPU (peak-GEMM probe, named syncs, GPU profile);
#   4. `kvstore bench tiers --quick` and `kvstore bench api --quick` (demotion/promotion and
#      the engine's data path, each figure beside the link limit measured in the same run).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-check}"
PY="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
cd "$ROOT" || exit 2
status=0
step() {  # step NAME SECONDS CMD...: stdout to NAME.out, stderr to NAME.err; remember a failure
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import sys, torch; cuda = torch.cuda.is_available(); \
print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), cuda and torch.cuda.get_device_name(0)); \
sys.exit(0 if cuda or '$DEVICE' == 'cpu' else 'no CUDA device')" | tee "$OUT/torch.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
ISSUE_TESTS="tests/allocator/test_delayed_copies.py tests/kvstore/test_cuda_paths.py \
tests/restore/test_executor_devices.py tests/restore/test_profiles_device.py \
tests/clients/test_put_device_kv.py tests/kvstore/test_device_config.py tests/kvstore/test_demo_timing.py"
# shellcheck disable=SC2086
step issue26-tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider $ISSUE_TESTS --junitxml="$OUT/issue26-tests.xml"
step cuda-tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests --junitxml="$OUT/cuda-tests.xml"
grep "SKIPPED" "$OUT/issue26-tests.out" "$OUT/cuda-tests.out" >> "$OUT/summary.txt"  # a GPU run should skip none
step calibrate 60 "$PY" -m kvstore calibrate --quick --refresh --json --device "$DEVICE" --profile "$OUT/profile.json"
step bench-tiers 90 "$PY" -m kvstore bench tiers --quick --json
step bench-api 120 "$PY" -m kvstore bench api --quick --no-ops --json
echo "overall status=$status (details in $OUT)" | tee -a "$OUT/summary.txt"
exit $status
