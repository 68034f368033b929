#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (one call of a few minutes): build brcd with CUDA, run the whole
# test suite (CUDA cases included) and the GPU benchmarks; logs and tables go under $OUT.
#
# Before the call, on the developer machine:  scripts/prepare_gpu_payload.sh   (copies the reference vectors and the
# wheels the GPU machine lacks into .gpu/ and .whl/). Then run with carry [".gpu", ".whl"]:
#     bash scripts/gpu_check.sh [gpu_bench.py arguments: --quick, --only topk|loss, --breakdown]
# Environment: TESTS (pytest paths, default tests/), TEST_FILTER (pytest -k), BENCH=0 (no benchmarks),
# PROFILE=1 (Nsight Compute sections of the top-k scan and the loss kernels into $OUT/ncu.txt), SUITE=1 (the
# pytest-benchmark suite's CUDA cases too, into $OUT/suite.txt and $OUT/suite.json).
# With .gpu/alt/ (prepare_gpu_payload.sh --alt REV): after the checks of the working tree, its files replace theirs,
# the extension is rebuilt (incrementally) and the tests and benchmarks run again into $OUT/alt/: an A/B of REV
# against HEAD in one call.
# DEADLINE_S (default 570): the whole script's budget in seconds, under the device tool's 600 s a call. Each stage's
# timeout is cut to what is left, a stage that cannot start in time is skipped (listed in $OUT/skipped.txt), and what
# ran is under $OUT either way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
STARTED=$(date +%s)
DEADLINE_S=${DEADLINE_S:-570}
# Seconds a stage may take: its own cap, or what is left of the budget less a margin to write the results; 0 when
# less than `floor` seconds would be left (the stage is then skipped).
stage_budget() {
  local cap=$1 floor=${2:-20} left
  left=$(( DEADLINE_S - ($(date +%s) - STARTED) - 10 ))
  if (( left < floor )); then echo 0; elif (( left < cap )); then echo "$left"; else echo "$cap"; fi
}
skip() { echo "skipped (time budget): $*" | tee -a "$OUT/skipped.txt"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[[ -f .gpu/vectors.pt ]] && export BRCD_REFERENCE_VECTORS=$PWD/.gpu/vectors.pt
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

# The toolchain torch will use, and what the built library links (C++ runtimes must match torch's). The image's
# default CXX (/opt/gcc) built a library whose C++ exceptions crashed the process; the system g++ is preferred.
echo "image CXX=${CXX:-unset}: $(${CXX:-c++} --version | head -1)"
if [[ -z "${BRCD_GPU_CXX:-}" && -x /usr/bin/g++ ]]; then BRCD_GPU_CXX=/usr/bin/g++; fi
export CXX=${BRCD_GPU_CXX:-${CXX:-c++}}
echo "using CXX=$CXX: $($CXX --version | head -1)"
build() {
  local start budget
  start=$(date +%s)
  budget=$(stage_budget 400 60)
  (( budget > 0 )) || { skip "build into $1"; return 1; }
  if ! BRCD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
      timeout "$budget" python3 setup.py build_ext --inplace >"$1/build.log" 2>&1; then
    grep -E "error" "$1/build.log" | head -30
    echo "BUILD FAILED"
    return 1
  fi
  echo "build: $(( $(date +%s) - start )) s"
  python3 -c "import brcd; print(brcd.build_info())"
}

run_tests() {
  local start budget
  start=$(date +%s)
  budget=$(stage_budget 300)
  (( budget > 0 )) || { skip "tests into $1"; return 0; }
  # pytest-xdist (on the GPU image) isolates a crashing test in its worker, so one crash cannot hide the rest.
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  timeout "$budget" python3 -m pytest -q $xdist --maxfail=30 -p no:cacheprovider ${TESTS:-tests/} -k "${TEST_FILTER:-}" \
    >"$1/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$1/tests.log" | tail -25
  echo "tests: $(( $(date +%s) - start )) s"
}

run_bench() {
  local start budget
  start=$(date +%s)
  budget=$(stage_budget 300)
  (( budget > 0 )) || { skip "benchmarks into $1"; return 0; }
  timeout "$budget" python3 benchmarks/gpu_bench.py --out "$1" "${@:2}" 2>&1 | tee "$1/bench.log" | tail -40
  echo "benchmarks: $(( $(date +%s) - start )) s"
}

run_profile() {
  local start budget
  start=$(date +%s)
  budget=$(stage_budget 240 60)
  (( budget > 0 )) || { skip "Nsight Compute profile"; return 0; }
  # One top-k (3 chunks: scan and select each) and one loss step; clocks left as the card runs them.
  timeout "$budget" ncu --clock-control none --launch-count 8 \
    --kernel-name "regex:scan_kernel|forward_kernel|backward_kernel|select_kernel" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
    python3 benchmarks/gpu_profile_target.py >"$OUT/ncu.txt" 2>&1
  metrics="Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy"
  grep -E "scan_kernel|forward_kernel|backward_kernel|select_kernel|$metrics" "$OUT/ncu.txt" | head -60
  echo "profile: $(( $(date +%s) - start )) s"
}

run_suite() {
  local start budget
  start=$(date +%s)
  budget=$(stage_budget 300)
  (( budget > 0 )) || { skip "pytest-benchmark suite"; return 0; }
  timeout "$budget" python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -k cuda \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/suite.json" >"$OUT/suite.txt" 2>&1
  grep -E "^(-|Name|test_)|passed|failed" "$OUT/suite.txt" | head -80
  echo "suite: $(( $(date +%s) - start )) s"
}

build "$OUT" || exit 1
ldd brcd/_C*.so | grep -E "stdc|gcc_s|gomp" || true
nm -D --defined-only brcd/_C*.so | grep -c -E "__cxa_throw|_Unwind_RaiseException" || true
run_tests "$OUT"

[[ "${PROFILE:-0}" == 1 ]] && command -v ncu >/dev/null && run_profile
[[ "${BENCH:-1}" != 0 ]] && run_bench "$OUT" "$@"
[[ "${SUITE:-0}" == 1 ]] && run_suite

if [[ -d .gpu/alt ]]; then
  files=$(cd .gpu/alt && find . -type f | sed 's|^./||' | paste -sd' ')
  echo "=== alternative $(cat .gpu/alt.rev 2>/dev/null): $files"
  mkdir -p "$OUT/alt"
  cp -r .gpu/alt/. .
  build "$OUT/alt" || exit 1
  run_tests "$OUT/alt"
  [[ "${BENCH:-1}" != 0 ]] && run_bench "$OUT/alt" "$@"
fi
echo "total: $(( $(date +%s) - STARTED )) s of a ${DEADLINE_S} s budget"
exit 0
