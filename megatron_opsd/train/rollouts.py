"""Each step's problems and their rollouts, generated at the step (``rollout.async: 0``) or one step
ahead, while the step before trains (``rollout.async: 1``).

The engine lives on global rank 0; every rank draws the same problems, in the same order in both
modes, and receives the rollouts by broadcast. Step ``t`` samples with seed ``(seed, t)`` in both
modes, so the modes differ only in the weights that sample: at the step (the newest synced
version) or one step earlier. Ahead, the sampling finishes before the weight sync that follows the
training step (``settle``): a step's rollouts all come from one version, never a mix, and what is
sampled does not depend on timing.

Each rollout's ``weight_version`` is checked against the version the engine held when asked (a
server that serves other weights stops the run), and its lag (optimizer steps between the
weights that sampled and the weights that train on it) is logged as ``rollout/weight_version_lag``.

Resume: sampling at the step, a resumed run draws the rollouts of the uninterrupted one (the loop
re-syncs the engine first); ahead, the rollouts already drawn for the next step are part of the
checkpoint (``states``) and are used as they are, so resuming is exact in both modes.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sources import Problem, ProblemIterator
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.rollout.engine import Rollout, RolloutEngine, SamplingParams


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence((seed, step)).generate_state(1)[0])


@dataclass
class StepRollouts:
    """One step's problems, their student prompts and rollouts, and the engine's version when asked."""

    step: int
    problems: list[Problem]
    prompts: list[list[int]]
    rollouts: list[list[Rollout]] | None = None
    version: int | None = None
    seconds: float = 0.0
    result: Callable[[], tuple[list[list[Rollout]], int, float]] | None = None  # rank 0: (rollouts, version, seconds)


class RolloutSource:
    """Draws each step's problems and their ``n`` rollouts per prompt (``n == 0``: problems only)."""

    def __init__(self, data: ProblemIterator, prompts: PromptBuilder, sampling: SamplingParams, n: int,
                 prompts_per_step: int, seed: int, ahead: bool, checks_versions: bool):
        self.data, self.prompts, self.sampling = data, prompts, sampling
        self.n, self.prompts_per_step, self.seed, self.ahead = n, prompts_per_step, seed, ahead
        self.checks_versions = checks_versions
        self.pending: StepRollouts | None = None  # the next step's, drawn ahead
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if ahead else None

    def take(self, step: int, last_step: int, engine: RolloutEngine | None) -> StepRollouts:
        """Step ``step``'s problems and rollouts from ``engine`` (rank 0's; collective); ahead, it
        also starts drawing step ``step + 1``'s unless ``step`` is ``last_step``."""
        pending = self.pending
        batch = pending if pending is not None and pending.step == step else self._request(step, engine)
        self.pending = None
        self._settle(batch)
        if self.ahead and step < last_step:
            self.pending = self._request(step + 1, engine)
        return batch

    def settle(self) -> None:
        """Wait for the rollouts drawn ahead (collective): before the weight sync, an evaluation or a
        checkpoint, none of which may overlap with the engine's sampling."""
        if self.pending is not None:
            self._settle(self.pending)

    def _request(self, step: int, engine: RolloutEngine | None) -> StepRollouts:
        problems = self.data.take(self.prompts_per_step)
        batch = StepRollouts(step, problems, [self.prompts.student_ids(p) for p in problems])
        if self.n == 0:
            return batch
        params = dataclasses.replace(self.sampling, n=self.n, seed=step_seed(self.seed, step))
        if dist.get_rank() == 0:
            prompts = batch.prompts

            def generate() -> tuple[list[list[Rollout]], int, float]:
                start = time.perf_counter()
                version = engine.weight_version
                return engine.generate(prompts, params), version, time.perf_counter() - start

            batch.result = self._pool.submit(generate).result if self.ahead else generate
        return batch

    def _settle(self, batch: StepRollouts) -> None:
        if self.n == 0 or batch.rollouts is not None:
            return
        batch.rollouts, batch.version, batch.seconds = broadcast_from_rank0(batch.result)
        batch.result = None
        if self.checks_versions:
            other = sorted({r.weight_version for group in batch.rollouts for r in group} - {batch.version})
            if other:
                raise RuntimeError(f"rollouts of step {batch.step} carry weight versions {other}, the engine was at "
                                   f"version {batch.version} when asked: a server serves other weights")

    # -- checkpoint part (ahead only): the next step's rollouts, as plain lists and dicts ------------

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        pending = self.pending
        if pending is None:
            return {"pending": None}
        return {"pending": {
            "step": pending.step, "version": pending.version, "seconds": pending.seconds,
            "problems": [dataclasses.asdict(p) for p in pending.problems],
            "rollouts": None if pending.rollouts is None else
            [[dataclasses.asdict(r) for r in group] for group in pending.rollouts]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["pending"]
        if saved is None:
            self.pending = None
            return
        problems = [Problem(**p) for p in saved["problems"]]
        rollouts = None if saved["rollouts"] is None else [
            [Rollout(tuple(r["response_ids"]), tuple(r["logprobs"]), r["finish_reason"], r["weight_version"])
             for r in group] for group in saved["rollouts"]]
        self.pending = StepRollouts(saved["step"], problems, [self.prompts.student_ids(p) for p in problems],
                                    rollouts, saved["version"], saved["seconds"])

    def close(self) -> None:
        """Stop drawing ahead (a run that ended early leaves its sampling unfinished, unused)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

