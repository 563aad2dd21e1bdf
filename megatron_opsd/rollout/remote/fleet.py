"""Inference servers started here as processes, or adopted by URL, watched and restarted.

- Servers started here are local subprocesses (a subclass says their command line and
  environment), each listening on its own port of the job's address; servers started elsewhere
  (the SLURM launcher's srun steps) are adopted by URL.
- Waiting for ``/health`` has a deadline and checks that each process is alive: a server that dies
  while starting fails the run at once, with the tail of its log.
- A server that died (or whose weights an update left partial) is restarted on its port from a
  weights directory; subclasses that route requests (SGLang's router) take it out first and put it
  back once it serves again (:meth:`ServerFleet.leave`, :meth:`ServerFleet.join`).
- On a GPU node each server started here gets ``servers.tp`` GPUs of its own
  (``CUDA_VISIBLE_DEVICES``), never one of the trainer's: a second process on a trainer's GPU, or
  two servers on one, fail their memory checks (:func:`place_servers`).

Every process of the fleet is a process group of its own, ended with the fleet (``stop``) and
killed with the trainer if it dies (``processes.die_with_parent``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from megatron_opsd.config import ConfigError
from megatron_opsd.platform import free_port
from megatron_opsd.processes import die_with_parent
from megatron_opsd.rollout.remote.http import Endpoint

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Endpoint)
RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
LAUNCHER_ENV_PREFIX = "TORCHELASTIC_"  # torchrun's own state, which a server must not take for its launcher's


class FleetError(RuntimeError):
    """A server (or router) that did not start, or died and could not be brought back."""


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Member(Generic[E]):
    """One server: its endpoint and, when the fleet started it, its process."""

    server: E
    index: int
    process: subprocess.Popen | None = None
    log: Path | None = None
    worker_id: str | None = None  # its id at a router

    @property
    def started_here(self) -> bool:
        return self.log is not None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None


def place_servers(count: int, tp: int, gpus: Sequence[int] | None, visible: Sequence[str],
                  trainer_gpus: int) -> list[str]:
    """Each of ``count`` servers' ``CUDA_VISIBLE_DEVICES``: ``tp`` consecutive GPUs of ``gpus``
    (indices into ``visible``, this node's devices as this process sees them; default: those after
    the trainer's), none of the first ``trainer_gpus`` (the trainer's ranks on this node), none twice."""
    wanted = list(gpus) if gpus is not None else list(range(trainer_gpus, len(visible)))
    where = f"servers.gpus={list(gpus)}" if gpus is not None else \
        f"this node's GPUs after the trainer's {trainer_gpus} ({len(wanted)} of {len(visible)})"
    problems = []
    if outside := [g for g in wanted if not 0 <= g < len(visible)]:
        problems.append(f"GPUs {outside} are not among this node's {len(visible)} ({','.join(visible)})")
    if taken := [g for g in wanted if 0 <= g < trainer_gpus]:
        problems.append(f"GPUs {taken} are the trainer's (its {trainer_gpus} rank(s) on this node use GPUs "
                        f"0-{trainer_gpus - 1})")
    if len(set(wanted)) != len(wanted):
        problems.append("a GPU is listed twice")
    if len(wanted) < count * tp:
        problems.append(f"{count} server(s) of servers.tp={tp} need {count * tp} GPUs")
    if problems:
        raise ConfigError(f"rollout servers on {where}: {'; '.join(problems)}; set servers.gpus to GPUs of their own, "
                          f"fewer servers.count, or fewer trainer ranks per node (the servers can also run "
                          f"elsewhere: urls)")
    return [",".join(visible[g] for g in wanted[i * tp:(i + 1) * tp]) for i in range(count)]


def visible_gpus() -> list[str]:
    """This node's CUDA devices as this process sees them (their ``CUDA_VISIBLE_DEVICES`` names)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class ServerFleet(Generic[E]):
    """The servers of ``cfg`` (a remote engine section: ``servers.count``, ``servers.base_port``,
    ``urls``, ``host``, ``timeouts``) as ``endpoint`` instances; subclasses give the command line.
    ``trainer_gpus``: how many of this node's GPUs the trainer's ranks hold (the first ones)."""

    endpoint: type[E]

    def __init__(self, cfg: Any, log_dir: Path, api_key: str | None, trainer_gpus: int = 0):
        self.cfg, self.log_dir, self.api_key, self.trainer_gpus = cfg, log_dir, api_key, trainer_gpus
        self.members: list[Member[E]] = []
        self.devices: list[str] = []  # each started server's CUDA_VISIBLE_DEVICES (none without CUDA)

    def server_command(self, model_path: str, port: int, version: int, load_format: str | None) -> list[str]:
        """The command line of the server on ``port`` serving ``model_path`` as ``version``."""
        raise NotImplementedError

    def server_env(self) -> Mapping[str, str]:
        """Environment variables a started server gets on top of this process's."""
        return {}

    def serving(self, member: Member[E], version: int) -> None:
        """``member`` answers /health, serving weight ``version`` (a server whose command line
        cannot name its version is told it here)."""

    # -- starting --------------------------------------------------------------------------------

    def start(self, model_path: str, version: int, load_format: str | None = None) -> None:
        """Start (or adopt) the servers, serving ``model_path`` as weight ``version`` (``load_format``
        ``dummy``: random weights from its config, until a weight sync)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        timeout = self.cfg.timeouts.control_s
        if self.cfg.urls:
            self.members = [Member(self.endpoint(url.rstrip("/"), self.api_key, timeout), i)
                            for i, url in enumerate(self.cfg.urls)]
        else:
            host, ports = self.cfg.host, self._server_ports()
            servers = self.cfg.servers
            if torch.cuda.is_available():
                self.devices = place_servers(servers.count, servers.tp, servers.gpus, visible_gpus(), self.trainer_gpus)
            self.members = [Member(self.endpoint(f"http://{host}:{port}", self.api_key, timeout), i,
                                   log=self.log_dir / f"server{i}.log") for i, port in enumerate(ports)]
            for member in self.members:
                self._launch(member, model_path, version, load_format)
        self._wait_healthy(self.members)
        for member in self.members:
            self.serving(member, version)

    def _server_ports(self) -> list[int]:
        base, count = self.cfg.servers.base_port, self.cfg.servers.count
        return [base + i for i in range(count)] if base else [free_port(self.cfg.host) for _ in range(count)]

    def _launch(self, member: Member[E], model_path: str, version: int, load_format: str | None = None) -> None:
        port = int(member.server.url.rsplit(":", 1)[1])
        command = self.server_command(model_path, port, version, load_format)
        shown = " ".join(command).replace(self.api_key, "***") if self.api_key else " ".join(command)
        devices = {"CUDA_VISIBLE_DEVICES": self.devices[member.index]} if self.devices else {}
        log.info("starting server %d: %s (log %s%s)", member.index, shown, member.log,
                 f", GPUs {devices['CUDA_VISIBLE_DEVICES']}" if devices else "")
        member.process = spawn(command, member.log, {**self.server_env(), **devices})

    def _wait_healthy(self, members: list[Member[E]]) -> None:
        """Every server answers /health before the startup deadline; a dead process fails at once."""
        deadline = time.monotonic() + self.cfg.timeouts.startup_s
        waiting = list(members)
        while waiting:
            for member in list(waiting):
                if not member.alive():
                    raise FleetError(f"server {member.index} ({member.server.url}) exited with code "
                                     f"{member.process.returncode} while starting; its log ({member.log}) ends:\n"
                                     f"{log_tail(member.log)}")
                if member.server.healthy(timeout_s=2.0):
                    waiting.remove(member)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(m.server.url for m in waiting)
                tails = "".join(f"\n--- {m.log}:\n{log_tail(m.log)}" for m in waiting if m.started_here)
                raise FleetError(f"no /health from {names} within {self.cfg.timeouts.startup_s:g} s{tails}")
            if waiting:
                time.sleep(0.2)

    # -- serving ---------------------------------------------------------------------------------

    @property
    def servers(self) -> list[E]:
        return [m.server for m in self.members]

    def dead(self) -> list[Member[E]]:
        """Servers started here whose process has exited, or that do not answer /health (asked at once)."""
        if not self.members:
            return []
        with ThreadPoolExecutor(len(self.members)) as pool:
            answers = list(pool.map(lambda m: m.alive() and m.server.healthy(timeout_s=5.0), self.members))
        return [m for m, ok in zip(self.members, answers, strict=True) if not ok]

    def leave(self, member: Member[E]) -> None:
        """Before ``member`` is restarted: stop sending it requests (a router: deregister it)."""

    def join(self, member: Member[E]) -> None:
        """After ``member`` serves again: send it requests again."""

    def routed(self) -> None:
        """Returns once requests reach every server (after they resumed generating)."""

    def restart(self, member: Member[E], model_path: str, version: int) -> None:
        """Bring ``member`` back serving ``model_path`` as ``version``: restarted on its port (a server
        started elsewhere cannot be: an error), healthy, then serving requests again."""
        if not member.started_here:
            raise FleetError(f"server {member.server.url} is unhealthy and was not started by this run: restart it")
        self.leave(member)
        stop_process(member.process)
        self._launch(member, model_path, version)
        self._wait_healthy([member])
        self.serving(member, version)
        self.join(member)
        log.warning("server %d (%s) restarted with weight version %d", member.index, member.server.url, version)

    def stop(self) -> None:
        for member in self.members:
            stop_process(member.process)
            member.server.close()


def spawn(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``command`` as a process group of its own, its output appended to ``log_path``, killed if this
    process dies; its environment is this one plus ``env``, without the rendezvous a single-process
    server would join and torchrun's own variables."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in RENDEZVOUS_ENV and not k.startswith(LAUNCHER_ENV_PREFIX)} | dict(env or {})
    if not Path(command[0]).is_file() and os.sep in command[0]:
        raise FleetError(f"no program {command[0]} (the fleet's servers.command)")
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=environment, preexec_fn=die_with_parent)  # noqa: PLW1509 - it only calls prctl


def stop_process(process: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """End a process group started here: SIGTERM, then SIGKILL after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
