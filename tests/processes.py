"""Processes of this machine, found by their command lines (to check that none outlives a run)."""
from __future__ import annotations

from pathlib import Path


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
