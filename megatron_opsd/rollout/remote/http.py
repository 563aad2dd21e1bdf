"""One inference server's (or router's) HTTP endpoint (httpx), each error naming the URL and the call.

Control calls are synchronous; generation is asynchronous (:meth:`Endpoint.post_async` on a shared
:meth:`Endpoint.async_client`), many requests in flight at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx


class ServerError(RuntimeError):
    """A server or router that answered with an error, or not at all."""


@dataclass
class Endpoint:
    """One HTTP endpoint of a fleet and the API key it requires."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _http(self) -> httpx.Client:
        """The control calls' client: a new connection per call. Calls come seconds or minutes apart,
        and a kept-alive connection the server closes as idle (uvicorn: after 5 s) just as a call reuses
        it fails that call ("Server disconnected without sending a response"), as seen in CI."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_keepalive_connections=0))
        return self._client

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None,
             expect: tuple[int, ...] = (200,), params: dict[str, str] | None = None) -> Any:
        """``method path`` with a JSON body; the parsed JSON reply (or its text). Any status outside
        ``expect`` or a transport error is a ServerError naming the URL, the call and the reply."""
        try:
            reply = self._http().request(method, path, json=body, params=params, timeout=timeout_s or self.timeout_s)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code not in expect:
            raise ServerError(f"{self.url}{path}: HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError:
            return reply.text

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            self.call("GET", "/health", timeout_s=timeout_s)
        except ServerError:
            return False
        return True

    async def post_async(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], timeout_s: float,
                         what: str) -> Any:
        """One POST of generation on ``client`` (the caller's, from :meth:`async_client`); ``what``
        names the request in errors (its rid)."""
        try:
            reply = await client.post(path, json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}{path} {what}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            raise ServerError(f"{self.url}{path} {what}: HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError as exc:
            raise ServerError(f"{self.url}{path} {what}: the reply is not JSON: {reply.text[:200]!r}") from exc

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout_s,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
