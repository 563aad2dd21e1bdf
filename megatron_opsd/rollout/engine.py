"""The rollout-engine contract the trainer talks to, and an engine that replays recorded rollouts.

The trainer only needs three things from whatever produces rollouts (the embedded engine, an
SGLang fleet, a file of recordings): sample responses for prompt token ids, accept new weights
as a stream of HF-named tensors, and say whether it is healthy. Keeping that surface small lets
the training step be tested against recorded rollouts, bit for bit, without any generator.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generate call (defaults: the paper's rollout recipe)."""

    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"invalid sampling params: {self}")


@dataclass(frozen=True)
class Rollout:
    """One sampled response: its token ids, the sampler's log-prob of each, and why it ended.

    A truncated response (``finish_reason == "length"``) is kept for training, as in the paper.
    """

    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.response_ids)} response ids but {len(self.logprobs)} log-probs")
        if not self.response_ids:
            raise ValueError("empty response")


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    weight_version: int
    detail: str = ""


class ProbeMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's after a weight sync (a wrong mapping).

    Raised by the training loop; defined here, with the contract it checks, so that the CLI can
    name it among its user errors without importing the loop (and Megatron)."""


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        """``params.n`` rollouts for each prompt, in prompt order."""

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors (streamed, one at a time); later generations use ``version``."""

    def health(self) -> EngineHealth: ...


@dataclass
class RecordedRolloutEngine:
    """Replays rollouts recorded per prompt; applies n, max_new_tokens and stop ids like a sampler.

    A prompt without a recording is an error (a test that silently got no data would prove nothing).
    """

    records: Mapping[tuple[int, ...], Sequence[Rollout]]
    weight_version: int = 0
    tensors_received: int = field(default=0, init=False)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        out = []
        for i, prompt in enumerate(prompts):
            recorded = self.records.get(tuple(prompt))
            if recorded is None:
                raise KeyError(f"no recorded rollout for prompt {i} (first ids {list(prompt[:8])})")
            if len(recorded) < params.n:
                raise ValueError(f"prompt {i}: {len(recorded)} recorded rollouts, {params.n} requested")
            out.append([_apply_limits(r, params) for r in recorded[: params.n]])
        return out

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        for name, tensor in tensors:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight stream must yield (name, tensor), got {type(name)}, {type(tensor)}")
            self.tensors_received += 1
        self.weight_version = version

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True, weight_version=self.weight_version, detail=f"{len(self.records)} recorded prompts")

    def save(self, path: str | Path) -> None:
        lines = [json.dumps({"prompt": list(p), "rollouts": [asdict(r) for r in rs]}) for p, rs in self.records.items()]
        Path(path).write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RecordedRolloutEngine:
        records = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records[tuple(row["prompt"])] = [
                    Rollout(tuple(r["response_ids"]), tuple(r["logprobs"]), r["finish_reason"]) for r in row["rollouts"]
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: bad recorded rollout: {exc}") from exc
        return cls(records)


def _apply_limits(rollout: Rollout, params: SamplingParams) -> Rollout:
    ids, logprobs, reason = rollout.response_ids, rollout.logprobs, rollout.finish_reason
    stops = [i for i, t in enumerate(ids) if t in params.stop_token_ids]
    if stops and stops[0] < params.max_new_tokens:
        end, reason = stops[0] + 1, "stop"
    elif len(ids) > params.max_new_tokens:
        end, reason = params.max_new_tokens, "length"
    else:
        end = len(ids)
    return Rollout(ids[:end], logprobs[:end], reason)
