#!/usr/bin/env bash
# Fetch the wheels tools/gpu_check.sh installs on the GPU machine (no internet there).
#
#   tools/gpu_wheels.sh [WHEEL_DIR]      (default: .whl, git-ignored; carry it to the machine)
#
# Run it where PyPI is reachable. It downloads, for the GPU machine's Python 3.12 on x86-64, only
# what its image lacks (tools/gpu_wheels.txt, written and checked by tools/gpu_deps.py), and fails
# if the wheels and the working tree that travels with them exceed what one call may carry (64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
CARRY_LIMIT=$((64 * 1024 * 1024))
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
grep -v '^#' tools/gpu_wheels.txt > "$WHEELS/requirements.txt"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform any -r "$WHEELS/requirements.txt"

wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | grep total$ \
       | awk '{s += $1} END {print s}')
count=$(ls "$WHEELS"/*.whl | wc -l)
echo "gpu_wheels: $count wheels, $((wheels / 1024 / 1024)) MiB, with the working tree $(((wheels + tree) / 1024 / 1024)) MiB of $((CARRY_LIMIT / 1024 / 1024)) MiB"
if [ "$count" -ne "$(wc -l < "$WHEELS/requirements.txt")" ]; then
    echo "gpu_wheels: expected one wheel per line of tools/gpu_wheels.txt" >&2; exit 1
fi
if [ $((wheels + tree)) -gt $CARRY_LIMIT ]; then
    echo "gpu_wheels: more than one call may carry to the GPU machine" >&2; exit 1
fi
