"""The rollout engine over an SGLang fleet: exactly one rollout per requested sample.

Each sample is one ``/generate`` request with its own ``rid`` and seed (``sequence_seed``, as the
embedded engine seeds its sequences), sent through the router with at most ``concurrency`` x
servers requests in flight. A failed, timed-out or malformed reply, or an aborted one (a pause
for a weight sync aborts what is running), is asked again under a new attempt rid, with backoff,
a bounded number of times (tenacity): only a complete reply becomes the sample's rollout, the
first one for its sample, so no sample is lost, duplicated, or trained on partially. When the
attempts run out, the error names the endpoint and the rid.

Control: the engine pauses, resumes and restarts servers one by one (never through the router),
and restarts a dead server before generating when there are weights on disk to restart it from.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from megatron_opsd.rollout.engine import EngineHealth, Rollout, SamplingParams, sequence_seed
from megatron_opsd.rollout.sglang.client import Server, SGLangError
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.fleet import Fleet, FleetError, Member
from megatron_opsd.rollout.sglang.protocol import (
    GREEDY_BELOW,
    MalformedReplyError,
    generate_request,
    parse_generate,
    parse_input_logprobs,
)

log = logging.getLogger(__name__)


class Aborted(Exception):
    """The server aborted the request (a pause); its partial tokens are dropped."""


class RolloutError(RuntimeError):
    """A sample that got no complete reply within its attempts."""


class SGLangEngine:
    """:class:`~megatron_opsd.rollout.engine.RolloutEngine` over a started :class:`Fleet`."""

    def __init__(self, fleet: Fleet, cfg: SGLangEngineConfig, vocab_size: int, run_id: str, weight_version: int = 0):
        self.fleet, self.cfg, self.vocab_size, self.run_id = fleet, cfg, vocab_size, run_id
        self.weight_version = weight_version
        self.weights_dir: Path | None = None  # the newest weights on disk (what a restarted server loads)
        self._calls = itertools.count()

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        self.restart_dead()
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        call = next(self._calls)
        bodies = [generate_request(prompt, params, f"{self.run_id}-c{call:06d}-s{i * params.n + k:06d}",
                                   sequence_seed(seed, i * params.n + k))
                  for i, prompt in enumerate(prompts) for k in range(params.n)]
        rollouts = asyncio.run(self._all(bodies))
        return [rollouts[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    async def _all(self, bodies: list[dict[str, Any]]) -> list[Rollout]:
        endpoint = self.fleet.generate_endpoint
        in_flight = asyncio.Semaphore(self.cfg.concurrency * self.cfg.fleet_size)
        async with endpoint.async_client() as client:
            return await asyncio.gather(*(self._sample(client, in_flight, endpoint, body) for body in bodies))

    async def _sample(self, client: httpx.AsyncClient, in_flight: asyncio.Semaphore, endpoint: Server,
                      body: dict[str, Any]) -> Rollout:
        rid, errors = body["rid"], []
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.timeouts.retries + 1), reraise=True,
                                 wait=wait_exponential(multiplier=0.2, max=10),
                                 retry=retry_if_exception_type((SGLangError, MalformedReplyError, Aborted)))
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    request = {**body, "rid": f"{rid}-a{number:02d}"}  # no rid is a prefix of another
                    try:
                        async with in_flight:
                            reply = await endpoint.generate(client, request, self.cfg.timeouts.request_s)
                        rollout = parse_generate(reply, request["rid"], self.vocab_size,
                                                 f"{endpoint.url} rid {request['rid']}")
                    except (SGLangError, MalformedReplyError) as exc:
                        errors.append(str(exc))
                        raise
                    if rollout is None:
                        errors.append(f"{endpoint.url} rid {request['rid']}: aborted")
                        raise Aborted(request["rid"])
                    return rollout
        except (SGLangError, MalformedReplyError, Aborted):
            raise RolloutError(f"sample {rid}: no complete reply in {len(errors)} attempt(s): "
                               + "; ".join(errors)) from None
        raise AssertionError("unreachable")

    def logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs through ``/generate`` with ``logprob_start_len=0`` on server 0
        (the servers hold the same weights: each sync checks their versions)."""
        server = self.fleet.servers[0]
        greedy = temperature < GREEDY_BELOW
        params = SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0, top_k=-1, max_new_tokens=1)
        out = []
        for i, ids in enumerate(sequences):
            rid = f"{self.run_id}-probe{next(self._calls):06d}-{i}"
            reply = server.call("POST", "/generate", generate_request(ids, params, rid, seed=0, logprob_start_len=0))
            out.append(torch.tensor(parse_input_logprobs(reply, rid, ids, f"{server.url} rid {rid}")))
        return out

    # -- control ---------------------------------------------------------------------------------

    def each_server(self, action: Callable[..., Any], *args: Any, members: Sequence[Member] | None = None,
                    check: bool = False) -> dict[int, Exception]:
        """``action(server, *args)`` on every server (or ``members``) at once, in threads; the
        failures by member index (empty when all succeeded). ``check``: raise the first one instead,
        naming its server."""
        members = list(self.fleet.members if members is None else members)
        if not members:
            return {}
        with ThreadPoolExecutor(len(members)) as pool:
            futures = {m.index: pool.submit(action, m.server, *args) for m in members}
        failed = {index: exc for index, f in futures.items() if (exc := f.exception()) is not None}
        if check and failed:
            index, exc = next(iter(failed.items()))
            raise SGLangError(f"server {index} ({self.fleet.members[index].server.url}): {action.__name__}: "
                              f"{exc}") from exc
        return failed

    def check_versions(self, version: int) -> None:
        """Every server reports ``version`` in /model_info; it becomes the engine's version."""
        wrong = {s.url: v for s in self.fleet.servers if (v := s.weight_version()) != str(version)}
        if wrong:
            raise SGLangError(f"after weight sync {version}, servers report other weight versions: {wrong}")
        self.weight_version = version

    def load_from_disk(self, path: Path, version: int, poisoned: Iterable[int] = ()) -> list[int]:
        """Every server serves the HF directory ``path`` as ``version``: paused (abort mode: nothing
        in flight), ``/update_weights_from_disk``, flushed, continued. A server in ``poisoned``
        (partial weights), or whose pause or load fails (dead, or left with partial weights), is
        restarted from ``path`` before it serves again. Returns the indices of the restarted servers."""
        failed: dict[int, Exception] = {i: SGLangError("left with partial weights by a failed update") for i in poisoned}
        failed |= self.each_server(Server.pause, "abort", members=self._except(failed))
        failed |= self.each_server(Server.update_weights_from_disk, str(path), version, members=self._except(failed))
        self.restart(failed, path, version)
        self.each_server(Server.flush_cache, members=self._except(failed), check=True)
        self.each_server(Server.resume, members=self._except(failed), check=True)
        self.weights_dir = path
        self.check_versions(version)
        return sorted(failed)

    def _except(self, failed: dict[int, Exception]) -> list[Member]:
        return [m for m in self.fleet.members if m.index not in failed]

    def restart(self, failed: dict[int, Exception], path: Path, version: int) -> None:
        """Restart the servers in ``failed`` (index -> why) serving ``path`` as ``version``."""
        for index, why in sorted(failed.items()):
            member = self.fleet.members[index]
            log.warning("server %d (%s) is restarted with weight version %d: %s", index, member.server.url,
                        version, why)
            self.fleet.restart(member, str(path), version)

    def restart_dead(self) -> None:
        """Restart servers that died, from the newest weights on disk (nothing to do without them:
        the next weight sync restarts them)."""
        if self.weights_dir is None:
            return
        self.restart({m.index: FleetError("not alive or unhealthy") for m in self.fleet.dead()}, self.weights_dir,
                     self.weight_version)

    def health(self) -> EngineHealth:
        dead = [m.server.url for m in self.fleet.dead()]
        detail = f"{len(self.fleet.members)} server(s), weight version {self.weight_version}"
        return EngineHealth(ok=not dead, detail=f"{detail}; unhealthy: {dead}" if dead else detail)

    def close(self) -> None:
        self.fleet.stop()
