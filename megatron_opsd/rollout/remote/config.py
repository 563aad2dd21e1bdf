"""What the config sections of the server-fleet engines share: adopted URLs, the job's address,
requests in flight, timeouts, and the servers' common keys."""
from __future__ import annotations

import sys

from pydantic import Field, model_validator

from megatron_opsd.section import Section


class TimeoutsConfig(Section):
    startup_s: float = Field(default=900.0, gt=0, description="for every server (and a router) to answer /health")
    request_s: float = Field(default=600.0, gt=0, description="for one generation request")
    control_s: float = Field(default=900.0, gt=0, description="for one control call (pause, weight update, ...)")
    retries: int = Field(default=3, ge=0, description="attempts after the first for a failed or malformed generation")


class ServersSection(Section):
    count: int = Field(default=2, ge=1, description="servers to start (one per data-parallel replica of the fleet)")
    tp: int = Field(default=1, ge=1, description="tensor-parallel size of each server")
    args: list[str] = Field(default_factory=list, description="more flags for every server")
    base_port: int | None = Field(default=None, ge=1, description="server i listens on base_port + i; None: free ports")
    gpus: list[int] | None = Field(
        default=None, description="the GPUs (indices among this node's visible devices) servers started here run "
        "on, tp consecutive ones each; default: the node's GPUs after the trainer's (its ranks on this node use the "
        "first ones); never the trainer's. Without CUDA: not used")
    command: list[str]  # each engine's section names its server's entry point

    def program(self) -> list[str]:
        """``command``, its ``python`` being this interpreter."""
        return [sys.executable if self.command[0] == "python" else self.command[0], *self.command[1:]]


class RemoteEngineSection(Section):
    urls: list[str] | None = Field(
        default=None, description="adopt servers started elsewhere (their URLs) instead of starting servers.count")
    host: str = Field(default="127.0.0.1", description="the address servers (and a router) bind (the job's interface)")
    concurrency: int = Field(default=64, ge=1, description="requests in flight per server")
    timeouts: TimeoutsConfig = TimeoutsConfig()

    def _extra_urls(self) -> list[str]:
        """More URLs of the section than ``urls`` (a router's)."""
        return []

    @model_validator(mode="after")
    def _urls_are_urls(self) -> RemoteEngineSection:
        bad = [u for u in [*(self.urls or ()), *self._extra_urls()] if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"rollout.engine.urls and router.url must be http(s) URLs: {bad}")
        return self

    @property
    def fleet_size(self) -> int:
        return len(self.urls) if self.urls else self.servers.count
