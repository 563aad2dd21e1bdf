"""The rollout engine over a server fleet: exactly one rollout per requested sample.

Each sample is one request with its own id and seed (``sequence_seed``, as the embedded engine
seeds its sequences), with at most ``concurrency`` x servers requests in flight. A failed,
timed-out or malformed reply, or an aborted one (a pause for a weight sync aborts what is
running), is asked again under a new attempt id, with backoff, a bounded number of times
(tenacity): only a complete reply becomes the sample's rollout, the first one for its sample, so
no sample is lost, duplicated, or trained on partially. When the attempts run out, the error names
the server and the id. A subclass says how one attempt is sent and read (:meth:`_attempt`).

Control: the engine pauses, loads, flushes, resumes and restarts servers one by one, all at once
in threads (never through a router), and restarts a dead server before generating when there are
weights on disk to restart it from. Servers offer ``pause``, ``load_weights(path, version)``,
``flush_cache``, ``resume`` and ``weight_version``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Generic

import torch
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from megatron_opsd.rollout.engine import EngineHealth, Rollout, SamplingParams, sequence_seed
from megatron_opsd.rollout.remote.fleet import E, FleetError, Member, ServerFleet
from megatron_opsd.rollout.remote.http import ServerError
from megatron_opsd.rollout.remote.replies import MalformedReplyError

log = logging.getLogger(__name__)

RETRIED = (ServerError, MalformedReplyError)


class Aborted(Exception):
    """The server aborted the request (a pause); its partial tokens are dropped."""


class RolloutError(RuntimeError):
    """A sample that got no complete reply within its attempts."""


class RemoteEngine(Generic[E]):
    """:class:`~megatron_opsd.rollout.engine.RolloutEngine` over a started :class:`ServerFleet`
    (``cfg``: its remote engine section: ``concurrency``, ``timeouts``, ``fleet_size``)."""

    def __init__(self, fleet: ServerFleet[E], cfg: Any, vocab_size: int, run_id: str, weight_version: int = 0):
        self.fleet, self.cfg, self.vocab_size, self.run_id = fleet, cfg, vocab_size, run_id
        self.weight_version = weight_version
        self.weights_dir: Path | None = None  # the newest weights on disk (what a restarted server loads)
        self._calls = itertools.count()

    # -- generation ------------------------------------------------------------------------------

    def _clients(self) -> AbstractAsyncContextManager[Any]:
        """The async HTTP client(s) one generate call sends its attempts with."""
        raise NotImplementedError

    async def _attempt(self, clients: Any, prompt: Sequence[int], params: SamplingParams, rid: str,
                       seed: int) -> Rollout | None:
        """One attempt at a sample: its rollout, None when the server aborted it; a ServerError or
        MalformedReplyError when it failed."""
        raise NotImplementedError

    def _score(self, server: E, ids: Sequence[int], temperature: float, rid: str) -> list[float]:
        """The log-probs of ``ids[1:]`` given what precedes each, from ``server`` (request ``rid``)."""
        raise NotImplementedError

    def logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs on server 0 (the servers hold the same weights: each sync
        checks their versions), at temperature 1 only: SGLang's and vLLM's prompt log-probs are the
        raw logits' ``log_softmax`` whatever temperature the request names."""
        if temperature != 1.0:
            raise ValueError(f"servers score prompt tokens at temperature 1 only (their prompt log-probs ignore the "
                             f"request's temperature), not {temperature}")
        server = self.fleet.servers[0]
        return [torch.tensor(self._score(server, ids, temperature, f"{self.run_id}-probe{next(self._calls):06d}-{i}"))
                for i, ids in enumerate(sequences)]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        self.restart_dead()
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        call = next(self._calls)
        samples = [(prompt, f"{self.run_id}-c{call:06d}-s{i * params.n + k:06d}", sequence_seed(seed, i * params.n + k))
                   for i, prompt in enumerate(prompts) for k in range(params.n)]
        rollouts = asyncio.run(self._all(samples, params))
        return [rollouts[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    async def _all(self, samples: list[tuple[Sequence[int], str, int]], params: SamplingParams) -> list[Rollout]:
        in_flight = asyncio.Semaphore(self.cfg.concurrency * self.cfg.fleet_size)
        async with self._clients() as clients:
            return await asyncio.gather(*(self._sample(clients, in_flight, prompt, params, rid, seed)
                                          for prompt, rid, seed in samples))

    async def _sample(self, clients: Any, in_flight: asyncio.Semaphore, prompt: Sequence[int], params: SamplingParams,
                      rid: str, seed: int) -> Rollout:
        errors: list[str] = []
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.timeouts.retries + 1), reraise=True,
                                 wait=wait_exponential(multiplier=0.2, max=10),
                                 retry=retry_if_exception_type((*RETRIED, Aborted)))
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_rid = f"{rid}-a{attempt.retry_state.attempt_number:02d}"  # no id is a prefix of another
                    try:
                        async with in_flight:
                            rollout = await self._attempt(clients, prompt, params, attempt_rid, seed)
                    except RETRIED as exc:
                        errors.append(str(exc))
                        raise
                    if rollout is None:
                        errors.append(f"rid {attempt_rid}: aborted")
                        raise Aborted(attempt_rid)
                    return rollout
        except (*RETRIED, Aborted):
            raise RolloutError(f"sample {rid}: no complete reply in {len(errors)} attempt(s): "
                               + "; ".join(errors)) from None
        raise AssertionError("unreachable")

    # -- control ---------------------------------------------------------------------------------

    def each_server(self, method: str, *args: Any, members: Sequence[Member[E]] | None = None,
                    check: bool = False) -> dict[int, Exception]:
        """``server.method(*args)`` on every server (or ``members``) at once, in threads; the
        failures by member index (empty when all succeeded). ``check``: raise the first one instead,
        naming its server."""
        members = list(self.fleet.members if members is None else members)
        if not members:
            return {}
        with ThreadPoolExecutor(len(members)) as pool:
            futures = {m.index: pool.submit(getattr(m.server, method), *args) for m in members}
        failed = {index: exc for index, f in futures.items() if (exc := f.exception()) is not None}
        if check and failed:
            index, exc = next(iter(failed.items()))
            raise ServerError(f"server {index} ({self.fleet.members[index].server.url}): {method}: {exc}") from exc
        return failed

    def resume(self, members: Sequence[Member[E]] | None = None) -> None:
        """Every server (or ``members``) generates again; returns once requests reach every server."""
        self.each_server("resume", members=members, check=True)
        self.fleet.routed()

    def check_versions(self, version: int) -> None:
        """Every server reports ``version``; it becomes the engine's version."""
        wrong = {s.url: v for s in self.fleet.servers if (v := s.weight_version()) != str(version)}
        if wrong:
            raise ServerError(f"after weight sync {version}, servers report other weight versions: {wrong}")
        self.weight_version = version

    def load_from_disk(self, path: Path, version: int, poisoned: Iterable[int] = ()) -> list[int]:
        """Every server serves the HF directory ``path`` as ``version``: paused (abort mode: nothing
        in flight), loaded, flushed, resumed. A server in ``poisoned`` (partial weights), or whose
        pause or load fails (dead, or left with partial weights), is restarted from ``path`` before
        it serves again. Returns the indices of the restarted servers."""
        failed: dict[int, Exception] = {i: ServerError("left with partial weights by a failed update") for i in poisoned}
        failed |= self.each_server("pause", members=self._except(failed))
        failed |= self.each_server("load_weights", str(path), version, members=self._except(failed))
        self.restart(failed, path, version)
        self.each_server("flush_cache", members=self._except(failed), check=True)
        self.resume(self._except(failed))
        self.weights_dir = path
        self.check_versions(version)
        return sorted(failed)

    def _except(self, failed: dict[int, Exception]) -> list[Member[E]]:
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
