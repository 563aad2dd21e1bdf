"""Multi-rank test harness: one torchrun launch runs many checks in shared processes.

A worker module defines check functions and ends with ``run_checks(CHECKS)``; a pytest module
launches it once (module-scoped fixture, see ``launch``) and turns each check into one test.
Process start-up with torch and Megatron imports costs seconds, so checks share the launch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, nproc: int, out_dir: Path, *args: str, timeout: float = 900) -> dict[str, dict]:
    """Run ``python -m module`` under torchrun with nproc ranks; return {check: {ok, error}}."""
    out = out_dir / f"{module.rsplit('.', 1)[-1]}-{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        "-m", module, "--results", str(out), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if not out.exists():
        raise RuntimeError(f"{module} wrote no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def run_checks(checks: dict[str, Callable[[], None]], setup: Callable[[], None] | None = None) -> None:
    """Worker side: init gloo, run every check on every rank, rank 0 writes the merged results.

    A check fails if it raises on any rank; the error text names the rank.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    ns, _ = parser.parse_known_args()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if setup is not None:
        setup()
    rank = dist.get_rank()
    results: dict[str, dict] = {}
    for name, check in checks.items():
        if ns.only and name not in ns.only:
            continue
        try:
            check()
            error = ""
        except Exception:  # noqa: BLE001 - reported per check, never swallowed
            error = f"rank {rank}: {traceback.format_exc()}"
        errors: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        bad = [e for e in errors if e]
        results[name] = {"ok": not bad, "error": "\n".join(bad)}
        dist.barrier()
    if rank == 0:
        Path(ns.results).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def assert_check(results: dict[str, dict], name: str) -> None:
    assert name in results, f"check {name!r} did not run; ran: {sorted(results)}"
    assert results[name]["ok"], results[name]["error"]
