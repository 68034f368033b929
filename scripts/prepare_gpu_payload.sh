#!/usr/bin/env bash
# Gathers what the GPU machine lacks (it reaches no network): the reference vectors and the expecttest wheel that
# torch.library.opcheck imports. Both folders are git-ignored; name them in the device call's carry.
#
#   scripts/prepare_gpu_payload.sh [--alt REV]
# --alt REV: also the files that REV changes since its merge base with HEAD, in .gpu/alt/ (same paths): the check
# then measures HEAD, swaps them in, rebuilds and measures again, in the same call (see gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu .whl
cp ../shared/reference/vectors.pt .gpu/vectors.pt
rm -rf .gpu/alt
if [[ "${1:-}" == "--alt" ]]; then
  rev=${2:?"--alt needs a revision"}
  git diff --name-only --diff-filter=AM "HEAD...$rev" | while read -r f; do
    mkdir -p ".gpu/alt/$(dirname "$f")"
    git show "$rev:$f" > ".gpu/alt/$f"
  done
  git rev-parse --short "$rev" > .gpu/alt.rev
  echo "alternative $rev: $(find .gpu/alt -type f | wc -l) files"
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl expecttest==0.3.0
ls -la .gpu .whl
