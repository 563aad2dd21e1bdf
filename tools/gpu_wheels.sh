#!/usr/bin/env bash
# Fill a wheel folder for tools/gpu_check.sh on a CUDA machine without internet.
#
#   tools/gpu_wheels.sh [WHEEL_DIR] [PYTHON_VERSION]     (defaults: .whl, this python's X.Y)
#
# Run it on a machine with internet, inside the project's environment: it pins the versions
# installed here of what the GPU checks import (megatron-core, transformers, safetensors, psutil,
# pytest + their dependencies), leaving out torch and everything torch brings (the GPU machine
# has its own CUDA torch), and downloads manylinux/pure-Python wheels for PYTHON_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
PY="${PYTHON:-python}"
PYVER="${2:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$WHEELS"

"$PY" - "$WHEELS/requirements.txt" <<'PY'
import re
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement


def closure(names):
    seen = {}
    todo = list(names)
    while todo:
        dist = distribution(todo.pop())
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


wanted = closure(["megatron-core", "transformers", "safetensors", "psutil", "pytest", "pytest-timeout", "httpx", "tenacity",
                  "fastapi", "uvicorn", "sglang-router"])
for name in closure(["torch"]):
    wanted.pop(name, None)
with open(sys.argv[1], "w") as f:
    f.writelines(f"{name}=={version}\n" for name, version in sorted(wanted.items()))
print(f"pinned {len(wanted)} packages in {sys.argv[1]}")
PY

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -r "$WHEELS/requirements.txt"
echo "wheels for python $PYVER in $WHEELS"
