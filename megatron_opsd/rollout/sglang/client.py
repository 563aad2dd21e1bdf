"""HTTP calls to one SGLang server or router (httpx), each error naming the URL and the call.

Control calls (pause, continue, flush, weight updates) go to each server directly: the router
forwards only generation (and ``/flush_cache``). They are synchronous; a caller that must fire
several at once (a weight-update rendezvous blocks until the trainer joins) runs them in threads.
Generation is asynchronous (:meth:`Server.generate`), many requests in flight at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed


class SGLangError(RuntimeError):
    """A server or router that answered with an error, or not at all."""


@dataclass
class Server:
    """One HTTP endpoint of the fleet (a server or the router) and the API key it requires."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s)
        return self._client

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None,
             expect: tuple[int, ...] = (200,)) -> Any:
        """``method path`` with a JSON body; the parsed JSON reply (or its text). Any status outside
        ``expect`` or a transport error is an SGLangError naming the URL, the call and the reply."""
        try:
            reply = self._http().request(method, path, json=body, timeout=timeout_s or self.timeout_s)
        except httpx.HTTPError as exc:
            raise SGLangError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code not in expect:
            raise SGLangError(f"{self.url}{path}: HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError:
            return reply.text

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            self.call("GET", "/health", timeout_s=timeout_s)
        except SGLangError:
            return False
        return True

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

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        self._update("/update_weights_from_disk",
                     {"model_path": model_path, "weight_version": str(version), "flush_cache": False})

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
        try:
            reply = await client.post("/generate", json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise SGLangError(f"{self.url}/generate rid {body.get('rid')}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            raise SGLangError(f"{self.url}/generate rid {body.get('rid')}: HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError as exc:
            raise SGLangError(f"{self.url}/generate rid {body.get('rid')}: the reply is not JSON: "
                              f"{reply.text[:200]!r}") from exc

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout_s,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

