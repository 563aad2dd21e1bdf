"""The JSON of vLLM 0.32's ``/v1/completions`` the product speaks (the OpenAI completion with
vLLM's extensions), for one sample per request.

Request: the prompt as token ids, ``return_token_ids``, the sample's ``seed``, ``request_id``,
``stop_token_ids`` with ``ignore_eos`` (a response ends at the run's stop tokens only, as in the
embedded engine, not also at the model config's EOS), and ``logprobs: 0`` (the sampled token's
log-prob) when they mean what the contract says: the servers run with ``--logprobs-mode
processed_logprobs``, which is ``log_softmax(logits / temperature)`` after top-k / top-p have cut
and renormalized the distribution, so only untruncated sampling (``top_k`` -1, ``top_p`` 1) gets
the contract's log-probs; truncated sampling gets rollouts without log-probs. Greedy reports the
raw ``log_softmax``.

Reply: ``choices[0]`` with ``token_ids`` (the stop token included), ``finish_reason`` (``stop``,
``length``, or ``abort`` for a request a pause aborted: HTTP 200 with its partial tokens) and
``logprobs.token_logprobs``; the reply's ``id`` is ``cmpl-<request_id>``. Teacher-forced scoring:
``prompt_logprobs: 0`` with one new token: ``choices[0].prompt_logprobs``, null first, then
``{"<token id>": {"logprob", "rank", "decoded_token"}}`` per position; these are the raw
``log_softmax(logits)`` in every logprobs mode (vLLM applies no temperature to prompt log-probs).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.remote.replies import MalformedReplyError, token_ids

MODEL_NAME = "opsd"  # --served-model-name of every server the fleet starts


def truncates(params: SamplingParams) -> bool:
    """Whether sampling cuts the distribution (then vLLM's log-probs are not the contract's)."""
    return params.temperature > 0 and (params.top_k != -1 or params.top_p < 1)


def completion_request(prompt: Sequence[int], params: SamplingParams, request_id: str, seed: int | None,
                       model: str = MODEL_NAME) -> dict[str, Any]:
    """The ``/v1/completions`` body of one sample."""
    body = {"model": model, "prompt": list(prompt), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "stop_token_ids": list(params.stop_token_ids), "ignore_eos": True, "skip_special_tokens": False,
            "return_token_ids": True, "request_id": request_id,
            "logprobs": None if truncates(params) else 0}
    if seed is not None:
        body["seed"] = seed
    return body


def _choice(reply: Any, request_id: str, where: str) -> dict[str, Any]:
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or len(reply["choices"]) != 1:
        raise MalformedReplyError(f"{where}: the reply is not an object with one choice")
    if reply.get("id", f"cmpl-{request_id}") != f"cmpl-{request_id}":
        raise MalformedReplyError(f"{where}: the reply is for request {reply.get('id')!r}")
    choice = reply["choices"][0]
    if not isinstance(choice, dict):
        raise MalformedReplyError(f"{where}: choices[0] is not an object")
    return choice


def parse_completion(reply: Any, request_id: str, params: SamplingParams, vocab_size: int, weight_version: int,
                     where: str) -> Rollout | None:
    """The rollout in a ``/v1/completions`` reply, sampled with ``weight_version``; None for an
    aborted request (to be asked again). ``where`` names the server and request in errors."""
    choice = _choice(reply, request_id, where)
    finish = choice.get("finish_reason")
    if finish == "abort":
        return None
    if finish not in ("stop", "length"):
        raise MalformedReplyError(f"{where}: finish_reason {finish!r} is not stop, length or abort")
    ids = token_ids(choice.get("token_ids"), vocab_size, where, "token_ids")
    if finish == "stop" and ids[-1] not in params.stop_token_ids:
        raise MalformedReplyError(f"{where}: finish_reason stop, but the last token {ids[-1]} is no stop token")
    logprobs = None
    if not truncates(params):
        values = (choice.get("logprobs") or {}).get("token_logprobs")
        if not isinstance(values, list) or len(values) != len(ids) or not all(isinstance(v, int | float) for v in values):
            raise MalformedReplyError(f"{where}: logprobs.token_logprobs is not one number per token of token_ids")
        logprobs = tuple(float(v) for v in values)
    return Rollout(tuple(ids), logprobs, finish, weight_version)


def parse_prompt_logprobs(reply: Any, request_id: str, prompt: Sequence[int], where: str) -> list[float]:
    """Log-probs of tokens ``1..len-1`` of ``prompt`` from a reply to ``prompt_logprobs: 0``."""
    entries = _choice(reply, request_id, where).get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(prompt) or entries[0] is not None:
        raise MalformedReplyError(f"{where}: prompt_logprobs is not null then one entry per prompt token")
    values = []
    for position, (entry, token) in enumerate(zip(entries[1:], prompt[1:]), start=1):
        scored = entry.get(str(token)) if isinstance(entry, dict) else None
        if not isinstance(scored, dict) or not isinstance(scored.get("logprob"), int | float):
            raise MalformedReplyError(f"{where}: prompt_logprobs[{position}] has no log-prob of token {token}")
        values.append(float(scored["logprob"]))
    return values
