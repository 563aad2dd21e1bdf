"""An engine that replays recorded rollouts: the training step, bit for bit, without a generator.

Recordings are a JSONL file, one line per prompt: ``{"prompt": [ids], "rollouts": [{"response_ids":
[...], "logprobs": [...], "finish_reason": "stop"}, ...]}``. The replay applies ``n``,
``max_new_tokens`` and the stop ids like a sampler would. Its rollouts do not depend on the
trainer's weights, so it takes no weight sync (``rollout.sync.kind: none``); it is for tests,
benchmarks of the trainer alone, and re-running a step on exactly the rollouts of another run.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from megatron_opsd.rollout.engine import EngineHealth, Rollout, SamplingParams
from megatron_opsd.section import Section


class RecordedEngineConfig(Section):
    kind: Literal["recorded"] = Field(description="replay recorded rollouts (rollout.sync.kind must be none)")
    path: str = Field(description="JSONL file of recorded rollouts, one line per prompt")


@dataclass
class RecordedRolloutEngine:
    """Replays rollouts recorded per prompt. A prompt without a recording is an error (a test that
    silently got no data would prove nothing)."""

    records: Mapping[tuple[int, ...], Sequence[Rollout]]
    weight_version: int = 0

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Rollout]]:
        out = []
        for i, prompt in enumerate(prompts):
            recorded = self.records.get(tuple(prompt))
            if recorded is None:
                raise KeyError(f"no recorded rollout for prompt {i} (first ids {list(prompt[:8])})")
            if len(recorded) < params.n:
                raise ValueError(f"prompt {i}: {len(recorded)} recorded rollouts, {params.n} requested")
            out.append([_apply_limits(r, params, self.weight_version) for r in recorded[: params.n]])
        return out

    def logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        raise NotImplementedError("a recorded engine replays rollouts; it has no model to score sequences with")

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True, detail=f"{len(self.records)} recorded prompts")

    def close(self) -> None:
        """Nothing to release: the recordings are in memory."""

    def save(self, path: str | Path) -> None:
        lines = [json.dumps({"prompt": list(p), "rollouts": [_record(r) for r in rs]}) for p, rs in self.records.items()]
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
                    Rollout(tuple(r["response_ids"]), _logprobs(r["logprobs"]), r["finish_reason"]) for r in row["rollouts"]
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: bad recorded rollout: {exc}") from exc
        return cls(records)


def _logprobs(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(values)


def _record(rollout: Rollout) -> dict:
    record = asdict(rollout)
    del record["weight_version"]  # the replay's own version applies
    return record


def _apply_limits(rollout: Rollout, params: SamplingParams, version: int) -> Rollout:
    ids, logprobs, reason = rollout.response_ids, rollout.logprobs, rollout.finish_reason
    stops = [i for i, t in enumerate(ids) if t in params.stop_token_ids]
    if stops and stops[0] < params.max_new_tokens:
        end, reason = stops[0] + 1, "stop"
    elif len(ids) > params.max_new_tokens:
        end, reason = params.max_new_tokens, "length"
    else:
        end = len(ids)
    return Rollout(ids[:end], None if logprobs is None else logprobs[:end], reason, version)
