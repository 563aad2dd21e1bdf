"""The GPU check's tooling, without a GPU: what the check imports resolves against the GPU
machine's image and the pinned wheels (tools/gpu_deps.py check), the scripts parse, and the check
runs every module that holds GPU tests."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tools.gpu_deps import GPU_TEST_MODULES

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_imports_only_what_the_gpu_machine_has_and_the_pinned_wheels():
    done = subprocess.run([sys.executable, "tools/gpu_deps.py", "check"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert "modules imported" in done.stdout


def test_the_scripts_parse_and_the_check_runs_every_gpu_module():
    for script in ("tools/gpu_check.sh", "tools/gpu_wheels.sh"):
        done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    check = (REPO / "tools/gpu_check.sh").read_text()
    with_gpu_tests = {f"tests.{p.stem}" for p in (REPO / "tests").glob("test_*.py")
                      if re.search(r"mark\.gpu\b", p.read_text())}
    assert with_gpu_tests == set(GPU_TEST_MODULES)
    for module in GPU_TEST_MODULES:
        assert f"tests/{module.split('.')[-1]}.py" in check, module
