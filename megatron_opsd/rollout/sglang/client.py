"""The HTTP calls of one SGLang server or router.

Control calls (pause, continue, flush, weight updates) go to each server directly: the router
forwards only generation (and ``/flush_cache``). They are synchronous; a caller that must fire
several at once (a weight-update rendezvous blocks until the trainer joins) runs them in threads.
Generation is asynchronous (:meth:`Server.generate`), many requests in flight at a time.
"""
from __future__ import annotations

from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from megatron_opsd.rollout.remote.http import Endpoint
from megatron_opsd.rollout.remote.http import ServerError as SGLangError


class Server(Endpoint):
    """One SGLang server (or the router)."""

    def model_info(self) -> dict[str, Any]:
        return self.call("GET", "/model_info")

    def weight_version(self) -> str:
        return str(self.model_info().get("weight_version"))

    def pause(self, mode: str = "abort") -> None:
        """Stop generating; in ``abort`` mode nothing is in flight when this returns."""
        self.call("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.call("POST", "/continue_generation", {})

    def flush_cache(self, deadline_s: float = 60.0) -> None:
        """Flush the prefix cache; SGLang refuses (400) while requests run, so retry until ``deadline_s``."""
        for attempt in Retrying(stop=stop_after_delay(deadline_s), wait=wait_fixed(0.5),
                                retry=retry_if_exception_type(SGLangError), reraise=True):
            with attempt:
                self.call("POST", "/flush_cache")

    def _update(self, path: str, body: dict[str, Any]) -> None:
        """A weight-update call: it answers ``{"success": bool, "message": str}``, with 400 when not successful."""
        reply = self.call("POST", path, body, expect=(200, 400))
        if not (isinstance(reply, dict) and reply.get("success")):
            message = reply.get("message") if isinstance(reply, dict) else reply
            raise SGLangError(f"{self.url}{path}: not successful: {message}")

    def load_weights(self, model_path: str, version: int) -> None:
        """``/update_weights_from_disk``: serve the HF directory ``model_path`` as ``version``. The
        load format is named: SGLang defaults it to the server's ``--load-format``, and a server
        started with ``dummy`` weights refuses to load a directory with that."""
        self._update("/update_weights_from_disk", {"model_path": model_path, "load_format": "auto",
                                                   "weight_version": str(version), "flush_cache": False})

    def update_weight_version(self, version: int) -> None:
        self.call("POST", "/update_weight_version", {"new_version": str(version), "abort_all_requests": False})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        self._update("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._update("/destroy_weights_update_group", {"group_name": group_name})

    def begin_weight_update(self) -> None:
        self._update("/begin_weight_update", {"selector": "all"})

    def end_weight_update(self) -> None:
        self._update("/end_weight_update", {})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, version: int) -> None:
        self._update("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "load_format": "flattened_bucket", "weight_version": str(version), "flush_cache": False})

    async def generate(self, client: httpx.AsyncClient, body: dict[str, Any], timeout_s: float) -> Any:
        """One ``/generate`` (``client`` is the caller's shared async client, based on this URL)."""
        return await self.post_async(client, "/generate", body, timeout_s, f"rid {body.get('rid')}")
