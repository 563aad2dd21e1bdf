"""The batch script's side of a job (``opsd launch slurm``): start each role's job step, wait for
the fleet, run the trainer, and decide what its end means.

- Every srun is started in the background and its PID recorded; the cleanup (however the launch
  ends) stops only those PIDs (srun then ends its step on every node), never by process name.
- Readiness: every server and the router announce their address and answer ``/health`` before
  the deadline, while each step's srun is checked alive; a step that dies fails the job at once
  with the tails of its logs.
- A stop request to the batch script (SIGTERM from ``--signal=B:TERM@N``, SIGINT) reaches the
  trainer as its stop file (``checkpoint.stop_file``), not as a signal: one request, however many
  processes SLURM signals and torchrun relays to, and the servers keep serving until the trainer
  has finished its step and written its checkpoint. A trainer that stopped (``run_dir/stopped.json``)
  has the job requeued, resubmitted or ended (``OPSD_ON_STOP``); one that failed fails the job with
  its logs' tails.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

import yaml

from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.launch import slurm
from megatron_opsd.launch.network import fabric_interface
from megatron_opsd.launch.plan import CONFIG_FILE, PLAN_FILE, Plan, Step
from megatron_opsd.launch.slurm import LaunchError
from megatron_opsd.launch.task import REGISTRY, announced
from megatron_opsd.rollout.factory import API_KEY_ENV
from megatron_opsd.rollout.sglang.client import Server
from megatron_opsd.rollout.sglang.fleet import log_tail
from megatron_opsd.train.loop import STOPPED


class Launch:
    """One launch of ``plan``'s steps; a context whose exit stops every step it started."""

    def __init__(self, plan: Plan):
        self.plan, self.started_at = plan, time.monotonic()
        self.processes: dict[str, subprocess.Popen] = {}
        self.stop_signal: int | None = None  # the latest stop request

    def phase(self, message: str) -> None:
        print(f"[launch][+{time.monotonic() - self.started_at:.1f}s] {message}", flush=True)

    # -- steps -----------------------------------------------------------------------------------

    def start(self, step: Step) -> None:
        self.processes[step.name] = subprocess.Popen(step.srun, stdin=subprocess.DEVNULL)
        self.phase(f"started {step.name} on {','.join(step.nodes)} (srun pid {self.processes[step.name].pid})")

    def tails(self, step: Step) -> str:
        output = next(a for a in step.srun if a.startswith("--output=")).removeprefix("--output=")
        paths = sorted(glob.glob(output.replace("%t", "*")))
        return "".join(f"\n--- {p}:\n{log_tail(Path(p))}" for p in paths) or f"\n(no log at {output})"

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.processes[name].poll()
            if code is not None:
                tails = self.tails(self.plan.step(name))
                raise LaunchError(f"step {name} ended with code {code}; its logs end:{tails}")

    def __enter__(self) -> Self:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()  # srun ends its step on every node
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.processes:
            self.phase("every step has ended")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum  # acted on by the waiting loops

    # -- the job ---------------------------------------------------------------------------------

    def wait_for_fleet(self) -> tuple[list[str], str | None]:
        """(server URLs, router URL or None) once every one answers /health; a dead step or the deadline fails."""
        deadline = self.started_at + self.plan.startup_s
        steps = ["router", "servers"] if self.plan.uses_router else ["servers"]
        names = [f"server-{s.index}" for s in self.plan.servers] + (["router"] if self.plan.uses_router else [])
        ready: dict[str, str] = {}
        api_key = os.environ.get(API_KEY_ENV)
        while len(ready) < len(names):
            self._raise_if_stopped()
            self.check_alive(*steps)
            for name in names:
                entry = announced(self.plan, name) if name not in ready else None
                if entry and Server(entry["url"], api_key, 5.0).healthy(timeout_s=2.0):
                    ready[name] = entry["url"]
                    self.phase(f"{name} answers at {entry['url']}")
            if len(ready) < len(names) and time.monotonic() > deadline:
                waiting = [n for n in names if n not in ready]
                tails = "".join(self.tails(self.plan.step(step)) for step in steps)
                raise LaunchError(f"no /health from {', '.join(waiting)} within {self.plan.startup_s:g} s; logs end:"
                                  f"{tails}")
            time.sleep(0.5)
        return [ready[f"server-{s.index}"] for s in self.plan.servers], ready.get("router")

    def _raise_if_stopped(self) -> None:
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal)

    def run_trainer(self) -> int:
        """Start the trainer step and wait for it, passing a stop request on as its stop file; its exit code."""
        self.start(self.plan.step("trainer"))
        process, stop_file = self.processes["trainer"], Path(self.plan.config["checkpoint"]["stop_file"])
        while process.poll() is None:
            if self.stop_signal is not None and not stop_file.exists():
                stop_file.touch()
                self.phase(f"{signal.Signals(self.stop_signal).name}: the trainer stops at its next phase boundary")
            time.sleep(0.5)
        return process.returncode


class Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def launch(plan: Plan) -> int:
    """Run the job ``plan`` describes; the job's exit code."""
    log_dir = Path(plan.log_dir)
    interface, address = fabric_interface(plan.fabric_prefix)  # fails at once on a prefix that matches nothing
    if plan.uses_fleet and plan.load_format is None and not any(Path(plan.model_path).glob("*.safetensors")):
        raise LaunchError(f"model.hf={plan.model_path} has no *.safetensors weights for the servers to load: set "
                          f"model.hf (and tokenizer) to the downloaded model, e.g. OPSD_OVERRIDES='model.hf=DIR'")
    (log_dir / REGISTRY).mkdir(parents=True, exist_ok=True)
    plan.save(log_dir / PLAN_FILE)
    os.environ.setdefault(API_KEY_ENV, secrets.token_urlsafe(24))  # one per job, passed to every step's tasks
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    stopped_marker = Path(plan.run_dir) / STOPPED
    with Launch(plan) as run:
        run.phase(f"job {plan.job.id} restart {plan.job.restart_count} on {len(plan.job.nodes)} nodes; this node: "
                  f"{interface} {address}; commit {_commit()}; plan {log_dir / PLAN_FILE}")
        try:
            urls, router = [], None
            if plan.uses_fleet:
                if plan.load_format == "dummy":
                    _write_model_files(plan)
                if plan.uses_router:
                    run.start(plan.step("router"))
                run.start(plan.step("servers"))
                urls, router = run.wait_for_fleet()
            config = plan.training_config(urls, router)
            atomic_write_text(log_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
            stopped_marker.unlink(missing_ok=True)
            code = run.run_trainer()
        except Stopped as stop:
            run.phase(f"{stop} before the trainer started")
            code, stopped = 128 + stop.signum, True
        else:
            stopped = stopped_marker.is_file()
            if code == 0:
                run.phase("the trainer finished")
            elif stopped:
                run.phase(f"the trainer stopped: {json.loads(stopped_marker.read_text())}")
            else:
                run.phase(f"the trainer failed with code {code}; its logs end:{run.tails(plan.step('trainer'))}")
    if not stopped or code == 0:
        return code
    return _after_stop(plan, code, run)


def _after_stop(plan: Plan, code: int, run: Launch) -> int:
    if plan.on_stop == "requeue":
        run.phase("requeueing the job (scontrol requeue): it resumes from its latest checkpoint")
        slurm.requeue(plan.job.id)
        time.sleep(60)  # SLURM ends this script as it requeues the job
        return code
    if plan.on_stop == "resubmit":
        job = slurm.resubmit(plan.job, plan.overrides)
        run.phase(f"resubmitted as job {job} (--dependency=singleton): it resumes from the latest checkpoint")
        return 0
    return code


def _write_model_files(plan: Plan) -> None:
    """The model directory servers start from when the run has no HF weights (config and tokenizer;
    ``--load-format dummy``: random weights until the first weight sync)."""
    from megatron_opsd.data.prompts import load_tokenizer
    from megatron_opsd.train.components import write_hf_files
    from megatron_opsd.train.config import TrainConfig

    cfg = TrainConfig.model_validate(plan.config)
    write_hf_files(Path(plan.model_path), cfg.model.hf_config(), cfg.model.dtype, load_tokenizer(cfg.tokenizer))


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"
