"""The JSON of SGLang 0.5.23's ``/generate`` the product speaks, both ways: what the client sends
and parses, and what the CPU stand-in (``opsd serve``) answers.

Request (one sample per request, so that every sample has its own ``rid``, the router accepts it,
and a retry or an abort concerns exactly one sample)::

    {"input_ids": [...], "sampling_params": {"temperature", "top_p", "top_k", "max_new_tokens",
     "stop_token_ids", "skip_special_tokens": false, "no_stop_trim": true, "sampling_seed"},
     "return_logprob": true, "logprob_start_len": -1, "rid": "..."}

Reply: ``output_ids`` (the stop token included), ``meta_info.output_token_logprobs`` as
``[logprob, token_id, text_or_null]`` triples of the same length, ``meta_info.finish_reason``
(``{"type": "stop" | "length" | "abort", ...}``), ``meta_info.weight_version`` (a string) and,
with ``logprob_start_len`` 0, ``meta_info.input_token_logprobs`` (the first entry's log-prob is
null). Log-probs are of ``softmax(logits / temperature)`` before top-k / top-p, as the embedded
engine reports them; greedy (temperature < 1e-6) reports the raw ``log_softmax``.

Weight buckets (``/update_weights_from_distributed`` with ``load_format: flattened_bucket``): the
bucket's tensors, in the order of its ``names``, each as its raw bytes, concatenated into one
uint8 tensor that is broadcast once (SGLang's ``FlattenedTensorBucket``, mixed dtypes allowed).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.remote.replies import MalformedReplyError, token_ids

# SGLang's SamplingParams fields (0.5.23): any other sampling_params key is answered with 400.
SAMPLING_KEYS = frozenset({
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "min_new_tokens", "stop", "stop_token_ids", "stop_regex", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n", "sampling_seed", "logit_bias",
    "json_schema", "regex", "ebnf", "structural_tag", "custom_params"})
GREEDY_BELOW = 1e-6  # SGLang treats a lower temperature as greedy (top_k 1, temperature 1)
# 1 (SGLang's default): /health runs a one-token generation and answers 503 after 20 s without an answer
HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"


def generate_request(input_ids: Sequence[int], params: SamplingParams, rid: str, seed: int | None,
                     logprob_start_len: int = -1) -> dict[str, Any]:
    """The ``/generate`` body of one sample."""
    sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                "max_new_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids),
                "skip_special_tokens": False, "no_stop_trim": True}
    if seed is not None:
        sampling["sampling_seed"] = seed
    return {"input_ids": list(input_ids), "sampling_params": sampling, "return_logprob": True,
            "logprob_start_len": logprob_start_len, "rid": rid}


def _triples(meta: dict[str, Any], key: str, where: str) -> list[list[Any]]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(t, list) and len(t) >= 2 for t in value):
        raise MalformedReplyError(f"{where}: meta_info.{key} is not a list of [logprob, token_id, text] triples")
    return value


def _meta(reply: Any, rid: str, where: str) -> dict[str, Any]:
    if not isinstance(reply, dict) or not isinstance(reply.get("meta_info"), dict):
        raise MalformedReplyError(f"{where}: the reply is not an object with meta_info")
    meta = reply["meta_info"]
    if meta.get("id", rid) != rid:
        raise MalformedReplyError(f"{where}: the reply is for rid {meta.get('id')!r}")
    return meta


def weight_version_of(meta: dict[str, Any], where: str) -> int:
    version = meta.get("weight_version")
    try:
        return int(version)
    except (TypeError, ValueError):
        raise MalformedReplyError(f"{where}: meta_info.weight_version {version!r} is not an integer version") from None


def parse_generate(reply: Any, rid: str, vocab_size: int, where: str) -> Rollout | None:
    """The rollout in a ``/generate`` reply; None for an aborted request (to be asked again: its
    partial tokens are never trained on). ``where`` names the server and rid in errors."""
    meta = _meta(reply, rid, where)
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind == "abort":
        return None
    if kind not in ("stop", "length"):
        raise MalformedReplyError(f"{where}: meta_info.finish_reason {finish!r} is not stop, length or abort")
    ids = token_ids(reply.get("output_ids"), vocab_size, where, "output_ids")
    triples = _triples(meta, "output_token_logprobs", where)
    if len(triples) != len(ids) or [t[1] for t in triples] != ids:
        raise MalformedReplyError(f"{where}: {len(triples)} output_token_logprobs for {len(ids)} output_ids, or for "
                                  f"other tokens")
    logprobs = [t[0] for t in triples]
    if not all(isinstance(lp, int | float) for lp in logprobs):
        raise MalformedReplyError(f"{where}: an output log-prob is not a number")
    return Rollout(tuple(ids), tuple(float(lp) for lp in logprobs), kind, weight_version_of(meta, where))


def parse_input_logprobs(reply: Any, rid: str, input_ids: Sequence[int], where: str) -> list[float]:
    """Log-probs of tokens ``1..len-1`` of ``input_ids`` from a reply to ``logprob_start_len=0``."""
    triples = _triples(_meta(reply, rid, where), "input_token_logprobs", where)
    if len(triples) != len(input_ids) or [t[1] for t in triples] != list(input_ids):
        raise MalformedReplyError(f"{where}: {len(triples)} input_token_logprobs for {len(input_ids)} input ids")
    values = [t[0] for t in triples[1:]]  # the first position predicts nothing: its log-prob is null
    if not all(isinstance(lp, int | float) for lp in values):
        raise MalformedReplyError(f"{where}: an input log-prob is not a number")
    return [float(lp) for lp in values]


def triples(token_ids: Sequence[int], logprobs: Sequence[float | None]) -> list[list[Any]]:
    """``[logprob, token_id, null]`` per token, as SGLang without ``return_text_in_logprobs`` writes them."""
    return [[lp, t, None] for lp, t in zip(logprobs, token_ids, strict=True)]


def finish_reason(reason: str, stop_id: int | None, max_new_tokens: int, message: str = "") -> dict[str, Any]:
    """SGLang's ``finish_reason`` object."""
    if reason == "stop":
        return {"type": "stop", "matched": stop_id}
    if reason == "length":
        return {"type": "length", "length": max_new_tokens}
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def generate_reply(rid: str, prompt_ids: Sequence[int], output_ids: Sequence[int], logprobs: Sequence[float],
                   finish: dict[str, Any], weight_version: int | str,
                   input_logprobs: Sequence[float | None] | None = None, e2e_latency: float = 0.0) -> dict[str, Any]:
    """A ``/generate`` reply in SGLang's shape (``--skip-tokenizer-init``: no ``text``)."""
    return {"output_ids": list(output_ids), "meta_info": {
        "id": rid, "finish_reason": finish, "prompt_tokens": len(prompt_ids), "weight_version": str(weight_version),
        "num_retractions": 0,
        "input_token_logprobs": triples(prompt_ids, input_logprobs) if input_logprobs is not None else [],
        "output_token_logprobs": triples(output_ids, logprobs), "output_token_logprobs_length": len(output_ids),
        "reasoning_tokens": 0, "completion_tokens": len(output_ids), "cached_tokens": 0, "e2e_latency": e2e_latency}}


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flattened_bucket buffer of ``tensors``: their bytes, in order, as one uint8 tensor."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def bucket_nbytes(dtypes: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    return sum(torch.Size(shape).numel() * getattr(torch, dtype).itemsize for dtype, shape in zip(dtypes, shapes, strict=True))


def unflatten_bucket(buffer: torch.Tensor, dtypes: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The tensors of a flattened_bucket buffer (views into it)."""
    out, start = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        torch_dtype = getattr(torch, dtype)
        nbytes = torch.Size(shape).numel() * torch_dtype.itemsize
        out.append(buffer[start:start + nbytes].view(torch_dtype).reshape(shape))
        start += nbytes
    if start != buffer.numel():
        raise ValueError(f"a bucket of {buffer.numel()} bytes for tensors of {start} bytes")
    return out
