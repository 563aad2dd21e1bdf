"""The ``rollout.engine`` section of ``kind: sglang``: the server fleet, the router, timeouts."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from megatron_opsd.section import Section


class ServersConfig(Section):
    count: int = Field(default=2, ge=1, description="servers to start (one per data-parallel replica of the fleet)")
    tp: int = Field(default=1, ge=1, description="tensor-parallel size of each server (--tp-size)")
    mem_fraction: float = Field(default=0.8, gt=0, le=1, description="--mem-fraction-static of each server")
    command: list[str] = Field(
        default_factory=lambda: ["python", "-m", "sglang.launch_server"],
        description="how a server is started (flags follow; 'python' is this interpreter); the CPU stand-in: "
        "[python, -m, megatron_opsd.cli, serve]")
    args: list[str] = Field(default_factory=list, description="more flags for every server")
    base_port: int | None = Field(default=None, ge=1, description="server i listens on base_port + i; None: free ports")


class RouterConfig(Section):
    enabled: bool = Field(default=True, description="generation through sglang-router; false: straight to server 0")
    url: str | None = Field(default=None, description="adopt a router started elsewhere (the SLURM launcher's): the "
                            "fleet registers its servers with it instead of starting one")
    policy: Literal["random", "round_robin", "cache_aware", "power_of_two"] = Field(
        default="round_robin", description="the router's load-balancing policy")
    port: int | None = Field(default=None, ge=1, description="the router's port; None: a free one")
    metrics_port: int | None = Field(default=None, ge=1, description="its Prometheus port; None: a free one")
    args: list[str] = Field(default_factory=list, description="more flags for the router")


class TimeoutsConfig(Section):
    startup_s: float = Field(default=900.0, gt=0, description="for every server (and the router) to answer /health")
    request_s: float = Field(default=600.0, gt=0, description="for one /generate")
    control_s: float = Field(default=900.0, gt=0, description="for one control call (pause, weight update, ...)")
    retries: int = Field(default=3, ge=0, description="attempts after the first for a failed or malformed /generate")


class SGLangEngineConfig(Section):
    kind: Literal["sglang"] = Field(description="SGLang servers behind sglang-router (rollout.sync.kind disk or "
                                                "distributed)")
    servers: ServersConfig = ServersConfig()
    urls: list[str] | None = Field(
        default=None, description="adopt servers started elsewhere (their URLs) instead of starting servers.count")
    host: str = Field(default="127.0.0.1", description="the address servers and router bind (the job's interface)")
    router: RouterConfig = RouterConfig()
    concurrency: int = Field(default=64, ge=1, description="requests in flight per server")
    timeouts: TimeoutsConfig = TimeoutsConfig()

    @model_validator(mode="after")
    def _urls_are_urls(self) -> SGLangEngineConfig:
        bad = [u for u in [*(self.urls or ()), self.router.url or "http://"] if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"rollout.engine.urls and router.url must be http(s) URLs: {bad}")
        return self

    @property
    def fleet_size(self) -> int:
        return len(self.urls) if self.urls else self.servers.count
