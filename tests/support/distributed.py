"""Multi-rank test harness: one torchrun launch runs many checks in shared processes.

A worker module defines check functions and ends with ``run_checks(CHECKS)``; a pytest module
turns it into one test per check with ``test_x = torchrun_checks("tests.workers.x", nproc)``, and
the first of those tests launches the worker for all of them. Process start-up with torch and
Megatron imports costs seconds, so checks share the launch.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from megatron_opsd.platform import free_port

REPO = Path(__file__).resolve().parents[2]


def launch(module: str, nproc: int, out_dir: Path, *args: str, timeout: float = 900) -> dict[str, dict]:
    """Run ``python -m module`` under torchrun with nproc ranks; return {check: {ok, error}}."""
    out = out_dir / f"{module.rsplit('.', 1)[-1]}-{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", module, "--results", str(out), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a leaked process holding it would hang the read
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        finally:
            leftover = _end_session(proc)
        log.seek(0)
        output = log.read()
    if leftover:
        raise RuntimeError(f"{module}: processes outlived their torchrun launch (killed now): {leftover}\n{output[-4000:]}")
    if not out.exists():
        raise RuntimeError(f"{module} wrote no results (exit {proc.returncode}):\n{output[-12000:]}")
    return json.loads(out.read_text())


def torchrun_checks(module: str, nproc: int, args: Callable[[Path], Sequence[str]] | None = None,
                    *, timeout: float = 900) -> Callable:
    """A pytest test with one case per check in ``module.CHECKS``, all answered by one launch.

    ``args(work)`` prepares the launch's work directory and returns the worker's extra arguments
    (default: ``--workdir WORK``). The launch's results, or the error that stopped it, are kept for
    the session, so a broken worker fails each check with its error once, not once per check.
    """
    checks = list(importlib.import_module(module).CHECKS)

    @pytest.mark.parametrize("check", checks)
    def test(check: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        key = (module, nproc)
        if key not in _LAUNCHES:
            work = tmp_path_factory.mktemp(module.rsplit(".", 1)[-1])
            extra = ("--workdir", str(work)) if args is None else args(work)
            try:
                _LAUNCHES[key] = launch(module, nproc, work, *extra, timeout=timeout)
            except Exception as error:  # noqa: BLE001 - kept and re-raised for every check
                _LAUNCHES[key] = error
        results = _LAUNCHES[key]
        if isinstance(results, Exception):
            raise results
        assert_check(results, check)

    return test


_LAUNCHES: dict[tuple[str, int], dict[str, dict] | Exception] = {}


def _end_session(proc: subprocess.Popen, grace_s: float = 5.0) -> list[str]:
    """Kill what is left of the launch's session (torchrun too, if it ran out of time); return the
    processes that were still there ``grace_s`` after torchrun ended (exiting helpers get that long)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + grace_s
    while (members := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = []
    for member in members:
        with contextlib.suppress(psutil.Error):
            leftover.append(f"pid {member.pid}: {' '.join(member.cmdline())[:200]}")
            member.kill()
    return leftover


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def workdir_arg() -> Path:
    """The ``--workdir`` a worker module was launched with (``launch(..., "--workdir", DIR)``)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    return Path(parser.parse_known_args()[0].workdir)


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
