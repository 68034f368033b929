#!/usr/bin/env bash
# One entry point for set-up, build, tests, examples and benchmarks. Each command first makes sure .venv/ exists
# with torch and the project's dependencies installed, and that the extension is built and up to date.
#
#   ./dev.sh test        set up, build, run the test suite (what CI runs)
#   ./dev.sh demo        set up, build, run `brcd demo` on Fashion-MNIST (the main job; report in runs/demo/)
#   ./dev.sh example     set up, build, run a short Hamming-search example
#   ./dev.sh bench       set up, build, run the CPU benchmarks (tables into docs/)
#   ./dev.sh build       set up and (re)build the extension only
#   ./dev.sh python ...  run the venv's python
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

cuda_include() {
  # The CUDA library headers come with the nvidia wheels torch pulled in.
  local inc
  inc=$("$PY" - <<'PY' 2>/dev/null || true
import glob, os, site
for base in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include"))):
        print(d)
PY
)
  printf '%s' "$(echo "$inc" | paste -sd: -)"
}

setup() {
  local stamp="$VENV/.brcd-setup" want
  want=$( (cat pyproject.toml; echo "${TORCH_PINS[*]}") | sha256sum | cut -d' ' -f1)
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  log "creating $VENV (torch ${TORCH_PINS[*]}; the first time takes a few minutes)"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check "${TORCH_PINS[@]}" "setuptools>=64" wheel ninja
  # --no-build-isolation: an isolated build environment would fetch torch again.
  BRCD_METADATA_ONLY=1 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[train,dev,bench]"
  echo "$want" > "$stamp"
}

build() {
  setup
  # nvcc may be a wrapper on the PATH: point torch at the toolkit's folder so that it finds the CUDA libraries.
  if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda/lib64 ]]; then export CUDA_HOME=/usr/local/cuda; fi
  local inc
  inc=$(cuda_include)
  mkdir -p build
  log "building brcd._C (incremental; log in build/last-build.log)"
  if ! CPATH="${inc}${CPATH:+:$CPATH}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" setup.py build_ext --inplace >build/last-build.log 2>&1; then
    grep -E "error|Error" build/last-build.log | head -40 >&2 || tail -40 build/last-build.log >&2
    log "build failed: see build/last-build.log"
    exit 1
  fi
  "$PY" -c "import brcd; print('brcd build:', brcd.build_info())"
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  build) build ;;
  test)
    build
    log "running the test suite"
    exec "$PY" -m pytest -q "$@"
    ;;
  demo)
    build
    # The data: Debian's dataset-fashion-mnist package, installed when missing and installable.
    if [[ ! -d /usr/share/datasets/fashion-mnist && " $* " != *" --data-dir "* ]]; then
      log "installing Debian's dataset-fashion-mnist"
      if [[ $(id -u) == 0 ]]; then sudo_=""; else sudo_="sudo"; fi
      $sudo_ apt-get update -qq >/dev/null && $sudo_ apt-get install -y -qq dataset-fashion-mnist >/dev/null ||
        log "could not install dataset-fashion-mnist: pass --data-dir with the four idx files"
    fi
    out="${BRCD_DEMO_OUT:-runs/demo}" prev=""
    for arg in "$@"; do  # an --out among the arguments wins (argparse takes the last one)
      [[ $prev == --out ]] && out=$arg
      [[ $arg == --out=* ]] && out=${arg#--out=}
      prev=$arg
    done
    "$PY" -m brcd demo --out "$out" --no-progress "$@"
    cat "$out/report.md"
    ;;
  example)
    build
    exec "$PY" examples/search.py "$@"
    ;;
  bench)
    build
    exec "$PY" benchmarks/run_cpu.py "$@"
    ;;
  python)
    build >/dev/null
    exec "$PY" "$@"
    ;;
  *)
    echo "usage: ./dev.sh {test|demo|example|bench|build|setup|python} [args]" >&2
    exit 2
    ;;
esac
