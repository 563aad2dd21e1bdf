"""SFT, the paper's baseline: cross-entropy on the reference solutions, in the same step runner.

A sample is ``prompt ; solution tokens ; end-of-turn`` with no rollout and no teacher side; the
loss is the per-token negative log-likelihood of the response (``loss`` is its mean), with
logits formed chunk by chunk from the final hidden states.

``teacher_prompt_fraction`` renders a share of the examples with the teacher's prompt (problem +
reference solution) instead. A warm-up for OPSD needs that: a small model trained on student
prompts only never learns to use a solution in its context, so its teacher role gives no signal
(the demo's warm-up study: bench/RESULTS.md, "CPU demo").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from megatron_opsd.algorithms.base import LossInputs, LossOutput
from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sample import Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.models.logprobs import token_logprobs
from megatron_opsd.section import Section


class SFTConfig(Section):
    teacher_prompt_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of each step's examples (the first ones drawn) "
        "rendered with the teacher prompt, solution included; an OPSD warm-up needs ~0.5")
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk of the cross-entropy's logits")


class SFT:
    name = "sft"
    rollouts_per_prompt = 0
    forward_passes = ()
    metric_sums = ()

    def __init__(self, cfg: SFTConfig, prompts: PromptBuilder, end_ids: Sequence[int], vocab_size: int):
        self.cfg, self.prompts, self.end_ids, self.vocab_size = cfg, prompts, tuple(end_ids), vocab_size

    def samples(self, problems: Sequence[Problem],
                rollouts: Sequence[Sequence[Sample]] | None) -> tuple[list[Sample], dict[str, float]]:
        """The first ``round(fraction * len(problems))`` get the teacher prompt (problems come
        shuffled, so that is a random share), the rest the student prompt."""
        teacher_count = round(self.cfg.teacher_prompt_fraction * len(problems))
        samples = []
        for i, problem in enumerate(problems):
            prompt = self.prompts.teacher_ids(problem) if i < teacher_count else self.prompts.student_ids(problem)
            solution = self.prompts.tokenizer.encode(problem.solution, add_special_tokens=False)
            samples.append(Sample(tuple(prompt), tuple(solution) + self.end_ids, group_id=i))
        return samples, {}

    def loss(self, inputs: LossInputs) -> LossOutput:
        targets = inputs.micro_batch.student.targets.to(inputs.hidden.device)
        nll = -token_logprobs(inputs.hidden, inputs.output_weight, targets, vocab_size=self.vocab_size,
                              groups=inputs.groups, chunk_size=self.cfg.chunk_size)
        return LossOutput(nll)

    def metrics(self, sums: Mapping[str, float], loss: float) -> dict[str, float]:
        return {}

    def states(self) -> dict:
        return {}
