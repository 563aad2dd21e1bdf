#!/usr/bin/env bash
# Every GPU-only check in one command on a CUDA machine, then one table (check, result, numbers).
#
#   tools/gpu_check.sh [WHEEL_DIR]        (default: .whl, filled by tools/gpu_wheels.sh)
#
# Made for the GPU machine lent to sessions (no internet, Python 3.12 with CUDA torch, transformers
# and most of what the checks import already there): the wheels of what its image lacks are
# installed into /tmp/site, never over its own packages. The checks (tests/test_models_gpu.py,
# tests/test_gpu_training.py; tests/test_sglang_real.py where SGLang is installed, Transformer
# Engine's where TE is) run in one pytest process within CHECK_TIMEOUT_S. With $OUT set (the device
# tool) the table and pytest's report are written there too.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
PY="${PYTHON:-python3}"
CHECK_TIMEOUT_S="${CHECK_TIMEOUT_S:-420}"
REPORT_DIR="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name()}, Python {sys.version.split()[0]}")
PY

SITE=/tmp/site
if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

set +e
timeout "$CHECK_TIMEOUT_S" "$PY" -m pytest -m gpu tests/test_models_gpu.py tests/test_gpu_training.py \
    tests/test_sglang_real.py -q -p no:cacheprovider --timeout 300 --junitxml="$REPORT_DIR/gpu_check.xml" \
    -o junit_family=xunit1 2>&1 | tee "$REPORT_DIR/gpu_check.log"
STATUS=${PIPESTATUS[0]}
set -e
if [ ! -f "$REPORT_DIR/gpu_check.xml" ]; then
    echo "gpu_check: pytest wrote no report (exit $STATUS; $CHECK_TIMEOUT_S s limit): see the log above" >&2
    exit "$STATUS"
fi

"$PY" - "$REPORT_DIR/gpu_check.xml" <<'PY' | tee "$REPORT_DIR/gpu_check_table.txt"
import sys
import xml.etree.ElementTree as ET

import torch

rows = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome, detail = "PASS", " ".join(f"{p.get('name')}={p.get('value')}" for p in case.iter("property"))
    for tag, name in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
        node = case.find(tag)
        if node is not None:
            outcome, detail = name, (node.get("message") or "").splitlines()[0][:100] if node.get("message") else ""
            break
    rows.append((case.get("name"), outcome, f"{float(case.get('time', 0)):.1f}", detail))
width = max((len(r[0]) for r in rows), default=10)
print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
print(f"{'check':<{width}}  result  time_s  numbers")
for name, outcome, seconds, detail in rows:
    print(f"{name:<{width}}  {outcome:<6}  {seconds:>6}  {detail}")
PY
exit $STATUS
