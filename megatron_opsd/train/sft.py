"""Supervised fine-tuning on reference solutions: the paper's SFT baseline and the demo's warm-up.

SFT is OPSD's student pass with a different per-token loss: ``-log p(y*_n | x, y*_<n)`` on the
tokens of the reference solution (+ end-of-turn) after the *student* prompt, instead of the
divergence to a teacher. :class:`SFTStep` therefore reuses :class:`OPSDStep` whole (packing,
pipeline schedule, exact global token mean over micro-batches and DP ranks, guarded optimizer
step, skip counting, metrics) and only replaces the teacher pass (none) and the loss function.

``teacher_prompt_fraction`` renders a share of the examples with the teacher's prompt (problem +
reference solution) instead. A warm-up for OPSD needs that: a small model trained on student
prompts only never learns to use a solution in its context, so its teacher role gives no signal
(in the demo study: teacher greedy accuracy 3% without mixing, 89% with half the examples mixed).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from pydantic import Field

from megatron_opsd.data.packing import MicroBatch, PackedSequences
from megatron_opsd.data.prompts import PromptBuilder, SequencePair
from megatron_opsd.data.sources import Problem
from megatron_opsd.opsd.logprobs import token_logprobs
from megatron_opsd.opsd.loss import LossConfig
from megatron_opsd.opsd.step import OPSDStep, StepConfig, StepResult, _select
from megatron_opsd.opsd.teacher import Teacher, TeacherConfig
from megatron_opsd.rollout.engine import Rollout
from megatron_opsd.section import Section


class SFTConfig(Section):
    teacher_prompt_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of each step's examples (the first ones drawn) "
        "rendered with the teacher prompt, solution included; an OPSD warm-up needs ~0.5")


def sft_pairs(items: Sequence[Problem], builder: PromptBuilder, end_ids: Sequence[int],
              teacher_prompt_fraction: float = 0.0) -> list[SequencePair]:
    """[prompt ; solution tokens ; end-of-turn] on both sides of the pair (the teacher side is
    packed but never run). The first ``round(fraction * len(items))`` items get the teacher prompt
    (items come shuffled, so that is a random share), the rest the student prompt."""
    teacher_count = round(teacher_prompt_fraction * len(items))
    pairs = []
    for i, item in enumerate(items):
        prompt = builder.teacher_ids(item) if i < teacher_count else builder.student_ids(item)
        sequence = tuple(prompt + builder.tokenizer.encode(item.solution, add_special_tokens=False) + list(end_ids))
        pairs.append(SequencePair(sequence, sequence, len(prompt), len(prompt)))
    return pairs


class SFTStep(OPSDStep):
    """Cross-entropy on the response tokens; ``loss`` is the mean per-token negative log-likelihood.

    ``loss_cfg`` supplies ``vocab_size`` and ``chunk_size`` (logits are formed chunk by chunk).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer,
                 scheduler: OptimizerParamScheduler, loss_cfg: LossConfig, cfg: StepConfig | None = None):
        params = [p for chunk in chunks for p in chunk.parameters()]
        super().__init__(chunks, optimizer, scheduler, Teacher(TeacherConfig(mode="live"), params), loss_cfg, cfg)

    def teacher_pass(self, batches: Sequence[MicroBatch]) -> list[None]:
        return [None] * len(batches) if parallel_state.is_pipeline_last_stage() else []

    def _loss(self, side: PackedSequences, teacher_hidden: None, hidden: torch.Tensor):
        student = _select(hidden, side)
        nll = -token_logprobs(student, self.model.output_weight(), side.targets.to(student.device),
                              vocab_size=self.loss_cfg.vocab_size, chunk_size=self.loss_cfg.chunk_size)
        total = nll.sum()
        worst = nll.detach().amax() if nll.numel() else torch.tensor(-float("inf"))
        zero = torch.zeros((), dtype=torch.float64)
        stats = {"loss_sum": total.detach().float(), "loss_max": worst,
                 "diag_agree": zero, "diag_clipped": zero, "diag_tokens": zero}
        return total, torch.tensor(nll.numel(), dtype=torch.int), stats

    def __call__(self, batches: Sequence[MicroBatch], rollouts: Sequence[Rollout] = (),
                 rollout_seconds: float | None = None) -> StepResult:
        result = super().__call__(batches, rollouts, rollout_seconds)
        for teacher_only in ("top1_agreement", "clip_fraction", "time/teacher_pass", "tokens_per_s/teacher_pass"):
            result.metrics.pop(teacher_only, None)
        return result
