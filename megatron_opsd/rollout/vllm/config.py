"""The ``rollout.engine`` section of ``kind: vllm``: the server fleet and timeouts."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from megatron_opsd.rollout.remote.config import RemoteEngineSection, ServersSection


class VLLMServersConfig(ServersSection):
    command: list[str] = Field(
        default_factory=lambda: ["python", "-m", "vllm.entrypoints.openai.api_server"],
        description="how a server is started (flags follow; 'python' is this interpreter); vLLM in an environment "
        "of its own: that environment's interpreter, e.g. [.venv-vllm/bin/python, -m, "
        "vllm.entrypoints.openai.api_server] (make vllm-env)")
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables for every server, "
                                "e.g. VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU)")
    weight_transfer: Literal["nccl", "gloo"] | None = Field(
        default=None, description="the weight-transfer backend the servers open, for rollout.sync.kind distributed: "
        "nccl (vLLM's, GPUs) or gloo (vLLM's NCCL protocol over gloo, registered by this project's worker extension: "
        "CPU servers); null: weights by disk only. Servers started elsewhere need --weight-transfer-config "
        "'{\"backend\": \"nccl\"}' (opsd_gloo for gloo)")


class VLLMEngineConfig(RemoteEngineSection):
    kind: Literal["vllm"] = Field(description="vLLM OpenAI-compatible servers, requests balanced by this process "
                                              "(rollout.sync.kind disk, or distributed with servers.weight_transfer)")
    servers: VLLMServersConfig = VLLMServersConfig()
