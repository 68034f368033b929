#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (one call of a few minutes): build brcd with CUDA, run the whole
# test suite (CUDA cases included) and the GPU benchmarks; logs and tables go under $OUT.
#
# Before the call, on the developer machine:  scripts/prepare_gpu_payload.sh   (copies the reference vectors and the
# wheels the GPU machine lacks into .gpu/ and .whl/). Then run with carry [".gpu", ".whl"]:
#     bash scripts/gpu_check.sh [gpu_bench.py arguments: --quick, --only topk|loss, --breakdown]
# Environment: TESTS (pytest paths, default tests/), TEST_FILTER (pytest -k), BENCH=0 (no benchmarks),
# PROFILE=1 (Nsight Compute sections of the top-k scan and the loss kernels into $OUT/ncu.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
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
start=$(date +%s)
if ! BRCD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
    python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import brcd; print(brcd.build_info())"
ldd brcd/_C*.so | grep -E "stdc|gcc_s|gomp" || true
nm -D --defined-only brcd/_C*.so | grep -c -E "__cxa_throw|_Unwind_RaiseException" || true

start=$(date +%s)
# pytest-xdist (on the GPU image) isolates a crashing test in its worker, so one crash cannot hide the rest.
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
timeout 300 python3 -m pytest -q $xdist --maxfail=30 -p no:cacheprovider ${TESTS:-tests/} -k "${TEST_FILTER:-}" \
  >"$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25
echo "tests: $(( $(date +%s) - start )) s"

if [[ "${PROFILE:-0}" == 1 ]] && command -v ncu >/dev/null; then
  start=$(date +%s)
  # One top-k (3 chunks: scan and select each) and one loss step; clocks left as the card runs them.
  timeout 240 ncu --clock-control none --launch-count 8 \
    --kernel-name "regex:scan_kernel|forward_kernel|backward_kernel|select_kernel" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
    python3 benchmarks/gpu_profile_target.py >"$OUT/ncu.txt" 2>&1
  grep -E "scan_kernel|forward_kernel|backward_kernel|select_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy" \
    "$OUT/ncu.txt" | head -60
  echo "profile: $(( $(date +%s) - start )) s"
fi

[[ "${BENCH:-1}" == 0 ]] && exit 0
start=$(date +%s)
timeout 300 python3 benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
echo "benchmarks: $(( $(date +%s) - start )) s"
