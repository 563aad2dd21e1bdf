"""Held-out evaluation during training: when it is due, and its metrics on every rank.

It samples on the rollout engine, which lives on global rank 0, and the other ranks wait for its
metrics (``parallel.broadcast_from_rank0``): an error there is raised on every rank.
"""
from __future__ import annotations

from pathlib import Path

from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sources import Problem
from megatron_opsd.eval.evaluate import evaluate
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.train.config import TrainEvalConfig


class Evaluator:
    """``problems`` (none: never due) every ``cfg.interval`` steps and at the last step, on
    ``engine`` (rank 0's, None elsewhere); reports in ``run_dir/eval``."""

    def __init__(self, cfg: TrainEvalConfig, problems: list[Problem], prompts: PromptBuilder, engine: RolloutEngine | None,
                 run_dir: Path, last_step: int):
        self.cfg, self.problems, self.prompts, self.engine = cfg, problems, prompts, engine
        self.run_dir, self.last_step = run_dir, last_step
        self.progress = False  # a progress bar on rank 0 (the tracker's setting)

    def due_at_start(self) -> bool:
        return bool(self.problems) and self.cfg.at_start

    def due(self, step: int) -> bool:
        return bool(self.problems) and (step == self.last_step or bool(self.cfg.interval and step % self.cfg.interval == 0))

    def run(self, step: int) -> dict[str, float]:
        """Eval metrics as ``eval/<name>`` (collective: computed on rank 0, known to every rank)."""
        out = self.run_dir / "eval" / f"step_{step:06d}.json"

        def metrics() -> dict[str, float]:
            report = evaluate(self.engine, self.problems, self.prompts, self.cfg, out=out, progress=self.progress)
            return {f"eval/{name}": value for name, value in report["metrics"].items()}

        return broadcast_from_rank0(metrics)
