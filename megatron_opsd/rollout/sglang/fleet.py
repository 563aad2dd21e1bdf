"""A fleet of SGLang servers behind the real sglang-router: started here or adopted, watched,
restarted.

- Servers are either started as local subprocesses (``servers.command``: ``python -m
  sglang.launch_server`` on GPUs, ``opsd serve`` as the CPU stand-in; both take the same flags:
  ``--model-path --host --port --tp-size --mem-fraction-static --api-key --weight-version
  --skip-tokenizer-init``), or adopted by URL when something else started them (the SLURM
  launcher's srun steps).
- Waiting for ``/health`` has a deadline and checks that each process is alive: a server that dies
  while starting fails the run at once, with the tail of its log.
- The router (``python -m sglang_router.launch_router``) binds the job's address with every port
  pinned, its metrics port too, and gets the servers through ``POST /workers``; one started
  elsewhere (``router.url``) is adopted the same way. It forwards only
  generation; control calls go to each server directly.
- A server that died (or whose weights an update left partial) is restarted on its port from a
  weights directory, taken out of the router first and put back only once it serves those weights.

Every process of the fleet is a process group of its own, ended with the fleet (``stop``) and
killed with the trainer if it dies (``processes.die_with_parent``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_opsd.platform import free_port
from megatron_opsd.processes import die_with_parent
from megatron_opsd.rollout.sglang.client import Server, SGLangError
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig

log = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """A server or the router that did not start, or died and could not be brought back."""


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Member:
    """One server: its endpoint and, when the fleet started it, its process."""

    server: Server
    index: int
    process: subprocess.Popen | None = None
    log: Path | None = None
    worker_id: str | None = None  # its id at the router

    @property
    def started_here(self) -> bool:
        return self.log is not None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None


@dataclass
class Fleet:
    cfg: SGLangEngineConfig
    log_dir: Path
    api_key: str | None
    members: list[Member] = field(default_factory=list)
    router: Server | None = None
    _router_process: subprocess.Popen | None = None

    # -- starting --------------------------------------------------------------------------------

    def start(self, model_path: str, version: int, load_format: str | None = None) -> None:
        """Start (or adopt) the servers, serving ``model_path`` as weight ``version`` (``load_format``
        ``dummy``: random weights from its config, until a weight sync), then the router."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        timeout = self.cfg.timeouts.control_s
        if self.cfg.urls:
            self.members = [Member(Server(url.rstrip("/"), self.api_key, timeout), i) for i, url in enumerate(self.cfg.urls)]
        else:
            host, ports = self.cfg.host, self._server_ports()
            self.members = [Member(Server(f"http://{host}:{port}", self.api_key, timeout), i,
                                   log=self.log_dir / f"server{i}.log") for i, port in enumerate(ports)]
            for member in self.members:
                self._launch(member, model_path, version, load_format)
        self._wait_healthy(self.members)
        if self.cfg.router.enabled:
            self._start_router()
            for member in self.members:
                self._register(member)
            self._wait_routed()

    def _server_ports(self) -> list[int]:
        base = self.cfg.servers.base_port
        count = self.cfg.servers.count
        return [base + i for i in range(count)] if base else [free_port(self.cfg.host) for _ in range(count)]

    def _launch(self, member: Member, model_path: str, version: int, load_format: str | None = None) -> None:
        port = int(member.server.url.rsplit(":", 1)[1])
        command = server_command(self.cfg, model_path, self.cfg.host, port, version, load_format, self.api_key)
        shown = " ".join(command).replace(self.api_key, "***") if self.api_key else " ".join(command)
        log.info("starting server %d: %s (log %s)", member.index, shown, member.log)
        member.process = _spawn(command, member.log)

    def _wait_healthy(self, members: list[Member]) -> None:
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

    def _start_router(self) -> None:
        router, host = self.cfg.router, self.cfg.host
        if router.url:  # started elsewhere: only reached
            self.router = Server(router.url.rstrip("/"), self.api_key, self.cfg.timeouts.control_s)
            self._wait_router(None, None)
            return
        port, metrics_port = router.port or free_port(host), router.metrics_port or free_port(host)
        self.router = Server(f"http://{host}:{port}", self.api_key, self.cfg.timeouts.control_s)
        router_log = self.log_dir / "router.log"
        self._router_process = _spawn(router_command(self.cfg, host, port, metrics_port, self.api_key), router_log)
        self._wait_router(self._router_process, router_log)

    def _wait_router(self, process: subprocess.Popen | None, log_path: Path | None) -> None:
        deadline = time.monotonic() + 60
        while not self.router.healthy(timeout_s=1.0):
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                where = f"its log ({log_path}) ends:\n{log_tail(log_path)}" if log_path else "it was started elsewhere"
                raise FleetError(f"the router did not answer /health ({self.router.url}); {where}")
            time.sleep(0.2)

    def _register(self, member: Member) -> None:
        reply = self.router.call("POST", "/workers", {"url": member.server.url, "worker_type": "regular",
                                                      **({"api_key": self.api_key} if self.api_key else {})},
                                 expect=(200, 202))
        member.worker_id = reply.get("worker_id") if isinstance(reply, dict) else None

    def _workers(self) -> list[dict]:
        return self.router.call("GET", "/workers").get("workers", [])

    def _wait_routed(self) -> None:
        """Every server is registered and healthy at the router."""
        deadline = time.monotonic() + self.cfg.timeouts.startup_s
        wanted = {m.server.url for m in self.members}
        while True:
            workers = {w["url"]: w for w in self._workers()}
            if all(url in workers and workers[url].get("is_healthy") for url in wanted):
                for member in self.members:
                    member.worker_id = workers[member.server.url].get("id", member.worker_id)
                return
            if time.monotonic() > deadline:
                raise FleetError(f"the router has not registered {sorted(wanted - set(workers))} within the deadline")
            time.sleep(0.2)

    # -- serving ---------------------------------------------------------------------------------

    @property
    def servers(self) -> list[Server]:
        return [m.server for m in self.members]

    @property
    def generate_endpoint(self) -> Server:
        """Where generation goes: the router, or the first server without one."""
        return self.router or self.members[0].server

    def dead(self) -> list[Member]:
        """Servers started here whose process has exited, or that do not answer /health."""
        return [m for m in self.members if not m.alive() or not m.server.healthy(timeout_s=5.0)]

    def restart(self, member: Member, model_path: str, version: int) -> None:
        """Bring ``member`` back serving ``model_path`` as ``version``: out of the router, restarted on
        its port (a server started elsewhere cannot be: an error), healthy, then routed again."""
        if not member.started_here:
            raise FleetError(f"server {member.server.url} is unhealthy and was not started by this run: restart it")
        if self.router is not None and member.worker_id is not None:
            self.router.call("DELETE", f"/workers/{member.worker_id}", expect=(200, 202, 404))
        _stop(member.process)
        self._launch(member, model_path, version)
        self._wait_healthy([member])
        if self.router is not None:
            self._register(member)
            self._wait_routed()
        log.warning("server %d (%s) restarted with weight version %d", member.index, member.server.url, version)

    def stop(self) -> None:
        for member in self.members:
            _stop(member.process)
            member.server.close()
        _stop(self._router_process)
        if self.router is not None:
            self.router.close()


def server_command(cfg: SGLangEngineConfig, model_path: str, host: str, port: int, version: int,
                   load_format: str | None = None, api_key: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one server of ``cfg`` (``servers.command`` and the flags both it and
    ``sglang.launch_server`` take); 'python' is this interpreter."""
    servers = cfg.servers
    program = [sys.executable if servers.command[0] == "python" else servers.command[0], *servers.command[1:]]
    command = [*program, "--model-path", model_path, "--host", host, "--port", str(port),
               "--tp-size", str(servers.tp), "--mem-fraction-static", str(servers.mem_fraction),
               "--weight-version", str(version), "--skip-tokenizer-init", *extra, *servers.args]
    if load_format:
        command += ["--load-format", load_format]
    if api_key:
        command.append(f"--api-key={api_key}")  # one word: a key may begin with "-"
    return command


def router_command(cfg: SGLangEngineConfig, host: str, port: int, metrics_port: int, api_key: str | None) -> list[str]:
    """The command line of the router of ``cfg``, bound to ``host`` with both its ports pinned; the
    servers are registered afterwards (``POST /workers``)."""
    command = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
               "--policy", cfg.router.policy, "--prometheus-host", host, "--prometheus-port", str(metrics_port),
               "--worker-startup-timeout-secs", str(int(cfg.timeouts.startup_s)),
               "--request-timeout-secs", str(int(cfg.timeouts.request_s)),
               "--health-check-interval-secs", "5", "--disable-circuit-breaker", "--log-level", "warn",
               *cfg.router.args]
    if api_key:
        command.append(f"--api-key={api_key}")  # one word: a key may begin with "-"
    return command


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen:
    """``command`` as a process group of its own, its output appended to ``log_path``, killed if this
    process dies; its environment is this one without the rendezvous a single-process server would join."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 - it only calls prctl


def _stop(process: subprocess.Popen | None, grace_s: float = 10.0) -> None:
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


__all__ = ["Fleet", "FleetError", "Member", "SGLangError", "router_command", "server_command"]
