#!/usr/bin/env bash
# Gathers what the GPU machine lacks (it reaches no network): the reference vectors and the expecttest wheel that
# torch.library.opcheck imports. Both folders are git-ignored; name them in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu .whl
cp ../shared/reference/vectors.pt .gpu/vectors.pt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl expecttest==0.3.0
ls -la .gpu .whl
