#!/usr/bin/env bash
# Run every GPU-only test in one go on a CUDA machine and print a short table.
#
#   tools/gpu_check.sh [WHEEL_DIR]        (default: .whl)
#
# Needs: python with a CUDA torch. No internet: the remaining dependencies (megatron-core,
# transformers, safetensors, psutil, pytest and their pure-Python / manylinux deps) are installed
# from WHEEL_DIR, which tools/gpu_wheels.sh fills on a machine with internet access.
# Transformer Engine is used when already installed; its checks are skipped otherwise. SGLang
# too: with it installed, tests/test_sglang_real.py starts one real server and runs the client,
# the contract fixtures and both weight syncs against it (too large to carry as wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
PY="${PYTHON:-python}"

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY

if [ -d "$WHEELS" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
fi

# Only the modules holding GPU tests: the others may import CPU-side extras not installed here.
mapfile -t FILES < <(grep -l "mark.gpu" tests/test_*.py)
REPORT="$(mktemp -d)/gpu.xml"
set +e
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -m gpu "${FILES[@]}" -q -p no:cacheprovider \
    --junitxml="$REPORT" -o junit_family=xunit1
STATUS=$?
set -e

"$PY" - "$REPORT" <<'PY'
import sys
import xml.etree.ElementTree as ET

rows = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = "PASS"
    for tag, name in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
        node = case.find(tag)
        if node is not None:
            outcome = name
            detail = (node.get("message") or "").splitlines()[0][:60]
            break
    else:
        detail = " ".join(f"{p.get('name')}={p.get('value')}" for p in case.iter("property"))
    rows.append((case.get("name"), outcome, detail))
width = max(len(r[0]) for r in rows) if rows else 10
print(f"\n{'check':<{width}}  result  detail")
for name, outcome, detail in rows:
    print(f"{name:<{width}}  {outcome:<6}  {detail}")
PY
exit $STATUS
