"""The rollout-engine contract the trainer talks to: the sampling schema, what a rollout is, and
the engine protocol.

Whatever produces rollouts (the embedded engine, recorded rollouts, an inference server fleet)
offers five things: sample responses for prompt token ids, score given sequences (teacher-forced
log-probs, for the probe check after a weight sync), say whether it is healthy, say which
weights it samples with (``weight_version``), and release what it holds (``close``). Loading new
weights is not part of the contract: each weight-sync strategy (``rollout/sync/``) knows the
engines it can feed.

Sampling has one schema, :class:`SamplingConfig` (the config sections of training rollouts and
of evaluation are subclasses that differ only in defaults), and one runtime form,
:class:`SamplingParams`, validated by that schema. ``top_k = -1`` turns top-k off (SGLang's
convention).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import Field, field_validator

from megatron_opsd.data.sample import Sample
from megatron_opsd.errors import UserError
from megatron_opsd.section import Section

FinishReason = Literal["stop", "length", "abort"]  # abort: a server's interrupted request, never trained on


class SamplingConfig(Section):
    """How responses are sampled (defaults: the paper's rollout recipe)."""

    temperature: float = Field(default=1.1, ge=0, description="sampling temperature; 0: greedy")
    top_p: float = Field(default=0.95, gt=0, le=1,
                         description="nucleus sampling: keep the smallest token set with this total probability")
    top_k: int = Field(default=20, ge=-1, description="keep the k most likely tokens; -1: no top-k truncation")
    max_new_tokens: int = Field(default=1024, ge=1, description="response length limit (tokens)")
    stop_tokens: list[str] | None = Field(default=None, description="tokens that end a response; default: the tokenizer's EOS")

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int) -> int:
        if top_k == 0:
            raise ValueError("top_k must be -1 (no top-k truncation) or at least 1")
        return top_k

    def params(self, tokenizer: Any, *, n: int = 1, seed: int | None = None) -> SamplingParams:
        """The runtime form, stop tokens resolved to ids with ``tokenizer``."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, self.stop_tokens),
                              n=n, seed=seed)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one generate call: :class:`SamplingConfig` with the stop tokens as
    ids, plus the number of samples per prompt and the seed."""

    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       max_new_tokens=self.max_new_tokens)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


def sequence_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` (prompt index * n + sample index) of a generate call seeded with
    ``seed``: a well-mixed 63-bit integer. Every engine seeds its sequences this way, so the same
    call gives the same rollouts in process and through a server fleet."""
    return int(np.random.SeedSequence((seed, index)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def stop_token_ids(tokenizer: Any, tokens: list[str] | None) -> tuple[int, ...]:
    """Token ids of ``tokens`` (default: the tokenizer's EOS); an unknown token is an error."""
    tokens = tokens if tokens is not None else [tokenizer.eos_token]
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"stop token {token!r} is not in the tokenizer's vocabulary")
        ids.append(token_id)
    return tuple(ids)


@dataclass(frozen=True)
class Rollout:
    """One sampled response: its token ids, the sampler's log-prob of each (of ``log_softmax(logits /
    temperature)`` before top-k / top-p; None from an engine that can report only another quantity
    for these sampling settings), why it ended, and the weight version it was sampled with.

    A truncated response (``finish_reason == "length"``) is kept for training, as in the paper.
    """

    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: FinishReason
    weight_version: int | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.response_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.response_ids)} response ids but {len(self.logprobs)} log-probs")
        if not self.response_ids:
            raise ValueError("empty response")


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    detail: str = ""


class ProbeMismatchError(UserError, RuntimeError):
    """The engine's log-probs disagree with the trainer's after a weight sync (a wrong mapping).

    Raised by the weight sync's probe check; defined here, beside the contract it checks. The user's
    to fix: the servers run another model, dtype or weight mapping than the trainer's."""


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int  # the version of the weights it samples with (0 until a first sync)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        """``params.n`` rollouts for each prompt, in prompt order."""

    def logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs of tokens ``1..len-1`` of each sequence under
        ``log_softmax(logits / temperature)``, the quantity the sampler reports."""

    def health(self) -> EngineHealth: ...

    def close(self) -> None:
        """Release what the engine holds outside this process (a server fleet); idempotent."""


def rollout_samples(prompts: Sequence[Sequence[int]], rollouts: Sequence[Sequence[Rollout]]) -> list[list[Sample]]:
    """Each prompt's rollouts as samples (their group id: the prompt's index)."""
    return [[Sample(tuple(prompt), r.response_ids, rollout_logprobs=r.logprobs, weight_version=r.weight_version,
                    group_id=group) for r in group_rollouts]
            for group, (prompt, group_rollouts) in enumerate(zip(prompts, rollouts, strict=True))]


def rollout_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Response length mean/max and the fraction of responses cut at max_new_tokens."""
    if not rollouts:
        return {}
    lengths = [len(r.response_ids) for r in rollouts]
    return {
        "response_len_mean": sum(lengths) / len(lengths),
        "response_len_max": float(max(lengths)),
        "truncation_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }
