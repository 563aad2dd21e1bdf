"""A fleet of SGLang servers behind the real sglang-router: started here or adopted, watched,
restarted (``remote.fleet``).

- Servers started here run ``servers.command``: ``python -m sglang.launch_server`` on GPUs, ``opsd
  serve`` as the CPU stand-in; both take the same flags (``--model-path --host --port --tp-size
  --mem-fraction-static --api-key --weight-version --skip-tokenizer-init``
  ``[--enable-deterministic-inference]``) and environment (:func:`server_env`).
- The router (``python -m sglang_router.launch_router``) binds the job's address with every port
  pinned, its metrics port too, and gets the servers through ``POST /workers``; one started
  elsewhere (``router.url``) is adopted the same way. It forwards only generation; control calls go
  to each server directly. A server being restarted is taken out of the router first and put back
  only once it serves again; after a weight sync resumes the servers, generation waits until the
  router routes to every one (:meth:`Fleet.routed`).
- The router drops a worker after 3 failed ``/health`` probes. SGLang's ``/health`` runs a
  one-token generation by default and fails (503) once its scheduler has been silent for 20 s,
  which it is while paused or loading weights: the router would drop every server during a long
  weight load. Servers therefore start with ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0`` (their
  ``/health`` then answers whether the server is up); servers started elsewhere need it too.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_opsd.platform import free_port
from megatron_opsd.rollout.remote.fleet import FleetError, Member, ServerFleet, log_tail, spawn, stop_process
from megatron_opsd.rollout.sglang.client import Server, SGLangError
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.protocol import HEALTH_GENERATION_ENV


class Fleet(ServerFleet[Server]):
    endpoint = Server

    def __init__(self, cfg: SGLangEngineConfig, log_dir: Path, api_key: str | None, trainer_gpus: int = 0):
        super().__init__(cfg, log_dir, api_key, trainer_gpus)
        self.router: Server | None = None
        self._router_process: subprocess.Popen | None = None

    def server_command(self, model_path: str, port: int, version: int, load_format: str | None) -> list[str]:
        return server_command(self.cfg, model_path, self.cfg.host, port, version, load_format, self.api_key)

    def server_env(self) -> Mapping[str, str]:
        return server_env()

    def start(self, model_path: str, version: int, load_format: str | None = None) -> None:
        """The servers (``ServerFleet.start``), then the router, every server registered with it."""
        super().start(model_path, version, load_format)
        if self.cfg.router.enabled:
            self._start_router()
            for member in self.members:
                self._register(member)
            self._wait_routed()

    def _start_router(self) -> None:
        router, host = self.cfg.router, self.cfg.host
        if router.url:  # started elsewhere: only reached
            self.router = Server(router.url.rstrip("/"), self.api_key, self.cfg.timeouts.control_s)
            self._wait_router(None, None)
            return
        port, metrics_port = router.port or free_port(host), router.metrics_port or free_port(host)
        self.router = Server(f"http://{host}:{port}", self.api_key, self.cfg.timeouts.control_s)
        router_log = self.log_dir / "router.log"
        self._router_process = spawn(router_command(self.cfg, host, port, metrics_port, self.api_key), router_log)
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

    def routed(self) -> None:
        if self.router is not None:
            self._wait_routed()

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

    @property
    def generate_endpoint(self) -> Server:
        """Where generation goes: the router, or the first server without one."""
        return self.router or self.members[0].server

    def leave(self, member: Member[Server]) -> None:
        if self.router is not None and member.worker_id is not None:
            self.router.call("DELETE", f"/workers/{member.worker_id}", expect=(200, 202, 404))

    def join(self, member: Member[Server]) -> None:
        if self.router is not None:
            self._register(member)
            self._wait_routed()

    def stop(self) -> None:
        super().stop()
        stop_process(self._router_process)
        if self.router is not None:
            self.router.close()


def server_env() -> dict[str, str]:
    """The environment every SGLang server of a fleet gets (see the module docstring: ``/health``)."""
    return {HEALTH_GENERATION_ENV: "0"}


def server_command(cfg: SGLangEngineConfig, model_path: str, host: str, port: int, version: int,
                   load_format: str | None = None, api_key: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one server of ``cfg`` (``servers.command`` and the flags both it and
    ``sglang.launch_server`` take); 'python' is this interpreter."""
    servers = cfg.servers
    command = [*servers.program(), "--model-path", model_path, "--host", host, "--port", str(port),
               "--tp-size", str(servers.tp), "--mem-fraction-static", str(servers.mem_fraction),
               "--weight-version", str(version), "--skip-tokenizer-init", *extra, *servers.args]
    if servers.deterministic_inference:
        command.append("--enable-deterministic-inference")
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


__all__ = ["Fleet", "FleetError", "SGLangError", "router_command", "server_command", "server_env"]
