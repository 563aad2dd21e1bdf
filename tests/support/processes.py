"""Processes of this machine, found by their command lines (to check that none outlives a run), and
the interpreter of the vLLM environment the real-server tests start servers with."""
from __future__ import annotations

import os
from pathlib import Path

VLLM_PYTHON = Path(os.environ.get("OPSD_VLLM_PYTHON", Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"))


def processes_matching(*words: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(w in cmdline for w in words):
            found.append(int(proc.name))
    return found
