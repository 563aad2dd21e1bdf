"""The rollout engine over vLLM servers (``remote.engine``), balanced by this process.

Requests are balanced here, not by a router: each attempt goes to the live server with the fewest
requests of this engine in flight, and a server that failed an attempt gets no more of the call's
attempts, so a dead server's samples are asked again on the others at once. (sglang-router would
add a process and a hop, and its worker registration reads SGLang's ``/model_info``, which vLLM
0.32 does not serve; its ``/server_info`` has other fields.)

Weight versions: vLLM's completion replies do not name the weights that sampled them. A weight
sync pauses every server in abort mode first, so a reply that completes was sampled with one
version; which one is known when no sync began between sending and receiving it: every sync moves
an epoch counter at its start and end, attempts are sent only between syncs, and a reply that saw
the epoch move is asked again, like an aborted one.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import httpx

from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.remote.engine import RemoteEngine
from megatron_opsd.rollout.remote.fleet import FleetError, Member, ServerFleet
from megatron_opsd.rollout.remote.http import ServerError
from megatron_opsd.rollout.vllm.client import VLLMServer
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.protocol import MODEL_NAME, completion_request, parse_completion, parse_prompt_logprobs

WORKER_DIR = Path(__file__).parent / "worker"  # holds only the worker extension, for the servers' PYTHONPATH
WORKER_EXTENSION = "opsd_vllm_worker.WeightReload"
GLOO_BACKEND = "opsd_gloo"  # the weight-transfer backend the worker extension registers


class VLLMFleet(ServerFleet[VLLMServer]):
    endpoint = VLLMServer
    cfg: VLLMEngineConfig

    def server_command(self, model_path: str, port: int, version: int, load_format: str | None) -> list[str]:
        return server_command(self.cfg, model_path, self.cfg.host, port, load_format, self.api_key)

    def server_env(self) -> Mapping[str, str]:
        return server_env(self.cfg, self.cfg.host)

    def serving(self, member: Member[VLLMServer], version: int) -> None:
        """Check that the server serves the model under the fleet's name (a server started elsewhere
        needs :meth:`server_command`'s flags), and tell it its version (its command line cannot)."""
        served = [m.get("id") for m in member.server.call("GET", "/v1/models").get("data", [])]
        if MODEL_NAME not in served:
            raise FleetError(f"server {member.server.url} serves {served}, not {MODEL_NAME!r}: start it with "
                             f"--served-model-name {MODEL_NAME} --logprobs-mode processed_logprobs "
                             f"--worker-extension-cls {WORKER_EXTENSION} (PYTHONPATH={WORKER_DIR}) and "
                             f"VLLM_SERVER_DEV_MODE=1")
        member.server.set_version(version)


def server_command(cfg: VLLMEngineConfig, model_path: str, host: str, port: int, load_format: str | None = None,
                   api_key: str | None = None) -> list[str]:
    """The command line of one server of ``cfg``: ``servers.command`` with the flags the engine
    relies on (the served model name, processed log-probs (after temperature) and the worker
    extension that reloads weights) and the dtype of the model directory's config (vLLM's ``auto``
    may pick another)."""
    servers = cfg.servers
    command = [*servers.program(), "--model", model_path, "--host", host, "--port", str(port),
               "--served-model-name", MODEL_NAME, "--tensor-parallel-size", str(servers.tp),
               "--dtype", model_dtype(Path(model_path)), "--logprobs-mode", "processed_logprobs",
               "--worker-extension-cls", WORKER_EXTENSION, *servers.args]
    if load_format:
        command += ["--load-format", load_format]
    if servers.weight_transfer:
        backend = {"nccl": "nccl", "gloo": GLOO_BACKEND}[servers.weight_transfer]
        command += ["--weight-transfer-config", json.dumps({"backend": backend})]
    if api_key:
        command.append(f"--api-key={api_key}")  # one word: a key may begin with "-"
    return command


def server_env(cfg: VLLMEngineConfig, host: str) -> dict[str, str]:
    """What a server of ``cfg`` needs in its environment: the RL control endpoints on, the worker
    extension importable, vLLM's internal messaging on the job's address ``host``, no usage
    reporting, then ``servers.env``."""
    path = os.pathsep.join(p for p in (str(WORKER_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path, "VLLM_NO_USAGE_STATS": "1"}
    if host not in ("0.0.0.0", "::"):
        env["VLLM_HOST_IP"] = host
    return env | cfg.servers.env


def model_dtype(model_dir: Path) -> str:
    """The dtype a Hugging Face directory's config names (``auto`` when it names none)."""
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


class VLLMEngine(RemoteEngine[VLLMServer]):
    fleet: VLLMFleet

    def __init__(self, fleet: VLLMFleet, cfg: VLLMEngineConfig, vocab_size: int, run_id: str, weight_version: int = 0):
        super().__init__(fleet, cfg, vocab_size, run_id, weight_version)
        self._epoch = 0  # moves when a weight sync begins or ends
        self._syncs = 0  # weight syncs under way (a broadcast's recovery by disk nests one)
        self._in_flight = [0] * len(fleet.members)
        self._failed: set[int] = set()  # servers that failed an attempt of the current call

    @property
    def in_flight(self) -> tuple[int, ...]:
        """This engine's requests in flight, per server."""
        return tuple(self._in_flight)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        self._failed = set()
        return super().generate(prompts, params)

    @asynccontextmanager
    async def _client_per_server(self):
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(m.server.async_client()) for m in self.fleet.members]

    def _clients(self) -> AbstractAsyncContextManager[list[httpx.AsyncClient]]:
        return self._client_per_server()

    def _pick(self) -> Member[VLLMServer]:
        """The server with the fewest requests in flight, those that failed in this call last."""
        return min(self.fleet.members, key=lambda m: (m.index in self._failed, self._in_flight[m.index], m.index))

    async def _attempt(self, clients: list[httpx.AsyncClient], prompt: Sequence[int], params: SamplingParams,
                       rid: str, seed: int) -> Rollout | None:
        while self._syncs:  # a weight sync is under way
            await asyncio.sleep(0.02)
        epoch, member = self._epoch, self._pick()
        self._in_flight[member.index] += 1
        try:
            reply = await member.server.complete(clients[member.index], completion_request(prompt, params, rid, seed),
                                                 self.cfg.timeouts.request_s)
        except ServerError:
            self._failed.add(member.index)
            raise
        finally:
            self._in_flight[member.index] -= 1
        if self._epoch != epoch:  # sampled before or after the sync's pause: unknown weights
            return None
        return parse_completion(reply, rid, params, self.vocab_size, self.weight_version,
                                f"{member.server.url} request {rid}")

    def _score(self, server: VLLMServer, ids: Sequence[int], temperature: float, rid: str) -> list[float]:
        """Through ``/v1/completions`` with ``prompt_logprobs``."""
        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=1)
        reply = server.call("POST", "/v1/completions", completion_request(ids, params, rid, 0) | {"prompt_logprobs": 0})
        return parse_prompt_logprobs(reply, rid, ids, f"{server.url} request {rid}")

    @contextmanager
    def syncing(self) -> Iterator[None]:
        """The servers' weights change inside: no attempt is sent, and a reply sent before is asked again."""
        self._syncs += 1
        self._epoch += 1
        try:
            yield
        finally:
            self._syncs -= 1
            self._epoch += 1

    def load_from_disk(self, path: Path, version: int, poisoned: Iterable[int] = ()) -> list[int]:
        with self.syncing():
            return super().load_from_disk(path, version, poisoned)
