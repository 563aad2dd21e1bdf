"""The HTTP calls of one vLLM server: OpenAI completions, and the RL control endpoints
(``VLLM_SERVER_DEV_MODE=1``) a weight sync uses, each error naming the URL and the call."""
from __future__ import annotations

from typing import Any

import httpx

from megatron_opsd.rollout.remote.http import Endpoint, ServerError

RELOAD = "opsd_reload"  # the worker extension's method (worker/opsd_vllm_worker.py)


class VLLMServer(Endpoint):
    def weight_version(self) -> str:
        return str(self.call("GET", "/weight_info").get("weight_version"))

    def set_version(self, version: int) -> None:
        self.call("POST", "/update_weight_version", {"new_version": str(version)})

    def pause(self) -> None:
        """Stop generating; abort mode: what was running is answered with finish_reason abort."""
        self.call("POST", "/pause", params={"mode": "abort"})

    def resume(self) -> None:
        self.call("POST", "/resume")

    def flush_cache(self) -> None:
        self.call("POST", "/reset_prefix_cache")

    def reload(self, model_path: str, refresh_tied_head: bool = True) -> None:
        """Every worker reloads the HF directory ``model_path`` in place (the worker extension)."""
        reply = self.call("POST", "/collective_rpc", {
            "method": RELOAD, "kwargs": {"path": model_path, "refresh_tied_head": refresh_tied_head}})
        if not (isinstance(reply, dict) and isinstance(reply.get("results"), list) and reply["results"]):
            raise ServerError(f"{self.url}/collective_rpc {RELOAD}: unexpected reply {str(reply)[:200]}")

    def load_weights(self, model_path: str, version: int) -> None:
        """Serve the HF directory ``model_path`` as ``version`` (while paused)."""
        self.reload(model_path)
        self.set_version(version)

    # -- vLLM's weight transfer (``--weight-transfer-config``): rollout.sync.kind distributed ----

    def world_size(self) -> int:
        """The server's workers (TP x PP x DP): its ranks in a weight-transfer group."""
        size = self.call("GET", "/get_world_size").get("world_size")
        if not isinstance(size, int) or size < 1:
            raise ServerError(f"{self.url}/get_world_size: no positive world_size in the reply")
        return size

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's weight-transfer group (returns once the trainer has joined too)."""
        self.call("POST", "/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.call("POST", "/start_weight_update")

    def update_weights(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        """Receive these tensors, in this order, from the group's rank 0 (returns once all arrived)."""
        self.call("POST", "/update_weights", {"update_info": {"names": names, "dtype_names": dtypes, "shapes": shapes}})

    def finish_weight_update(self, version: int) -> None:
        """End the update (vLLM's layerwise reload finishes here) and serve the weights as ``version``."""
        self.call("POST", "/finish_weight_update", {"weight_version": str(version)})

    def shutdown_weight_transfer(self) -> None:
        self.call("POST", "/shutdown_weight_transfer_engine")

    async def complete(self, client: httpx.AsyncClient, body: dict[str, Any], timeout_s: float) -> Any:
        return await self.post_async(client, "/v1/completions", body, timeout_s, f"request {body.get('request_id')}")
