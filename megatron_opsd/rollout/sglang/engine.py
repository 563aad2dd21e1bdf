"""The rollout engine over an SGLang fleet (``remote.engine``): each sample one ``/generate`` with
its ``rid`` and ``sampling_seed``, sent through the router; the rollout carries the weight version
the reply names."""
from __future__ import annotations

from collections.abc import Sequence

import httpx

from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.remote.engine import RemoteEngine, RolloutError
from megatron_opsd.rollout.sglang.client import Server
from megatron_opsd.rollout.sglang.fleet import Fleet
from megatron_opsd.rollout.sglang.protocol import generate_request, parse_generate, parse_input_logprobs


class SGLangEngine(RemoteEngine[Server]):
    fleet: Fleet

    def _clients(self) -> httpx.AsyncClient:
        return self.fleet.generate_endpoint.async_client()

    async def _attempt(self, clients: httpx.AsyncClient, prompt: Sequence[int], params: SamplingParams, rid: str,
                       seed: int) -> Rollout | None:
        endpoint = self.fleet.generate_endpoint
        reply = await endpoint.generate(clients, generate_request(prompt, params, rid, seed), self.cfg.timeouts.request_s)
        return parse_generate(reply, rid, self.vocab_size, f"{endpoint.url} rid {rid}")

    def _score(self, server: Server, ids: Sequence[int], temperature: float, rid: str) -> list[float]:
        """Through ``/generate`` with ``logprob_start_len=0`` (one greedy token: nothing is sampled)."""
        params = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=1)
        reply = server.call("POST", "/generate", generate_request(ids, params, rid, seed=0, logprob_start_len=0))
        return parse_input_logprobs(reply, rid, ids, f"{server.url} rid {rid}")


__all__ = ["RolloutError", "SGLangEngine"]
