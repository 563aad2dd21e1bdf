"""The ``rollout.engine`` section of ``kind: sglang``: the server fleet, the router, timeouts."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from megatron_opsd.rollout.remote.config import RemoteEngineSection, ServersSection
from megatron_opsd.section import Section


class ServersConfig(ServersSection):
    mem_fraction: float = Field(default=0.8, gt=0, le=1, description="--mem-fraction-static of each server")
    deterministic_inference: bool = Field(
        default=False, description="start the servers with --enable-deterministic-inference: SGLang honours each "
        "request's sampling_seed only then, so that a rollout repeats exactly (a resumed or requeued run samples the "
        "rollouts of the uninterrupted one); costs SGLang's batch-invariant kernels (slower decoding). Off: every "
        "attempt samples anew")
    command: list[str] = Field(
        default_factory=lambda: ["python", "-m", "sglang.launch_server"],
        description="how a server is started (flags follow; 'python' is this interpreter); the CPU stand-in: "
        "[python, -m, megatron_opsd.cli, serve]")


class RouterConfig(Section):
    enabled: bool = Field(default=True, description="generation through sglang-router; false: straight to server 0")
    url: str | None = Field(default=None, description="adopt a router started elsewhere (the SLURM launcher's): the "
                            "fleet registers its servers with it instead of starting one")
    policy: Literal["random", "round_robin", "cache_aware", "power_of_two"] = Field(
        default="round_robin", description="the router's load-balancing policy")
    port: int | None = Field(default=None, ge=1, description="the router's port; None: a free one")
    metrics_port: int | None = Field(default=None, ge=1, description="its Prometheus port; None: a free one")
    args: list[str] = Field(default_factory=list, description="more flags for the router")


class SGLangEngineConfig(RemoteEngineSection):
    kind: Literal["sglang"] = Field(description="SGLang servers behind sglang-router (rollout.sync.kind disk or "
                                                "distributed)")
    servers: ServersConfig = ServersConfig()
    router: RouterConfig = RouterConfig()

    def _extra_urls(self) -> list[str]:
        return [self.router.url] if self.router.url else []
