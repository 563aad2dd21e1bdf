"""On-Policy Self-Distillation: one rollout per problem, scored by the same model as teacher.

Samples: each rollout of the student prompt gets the problem's teacher prompt (problem +
privileged reference solution) as its teacher side. The teacher pass runs the teacher side with
the teacher's weights in the model (``Teacher.weights_in_model``: fixed, EMA or live) and keeps
the final hidden states of the response-predicting positions ([R, H], not [R, V]: V/H times
smaller); the loss recomputes teacher logits chunk by chunk from them and the teacher's
output-layer shard (``fused_token_divergence``). Packing puts sample i in micro-batch j on both
sides in the same order, so row r of the teacher states and row r of the student states predict
the same token.

Diagnostics on ``diagnostic_tokens`` evenly spaced tokens per micro-batch: teacher-student top-1
agreement and the fraction of tokens where the per-entry clip bit. With the rollouts' log-probs
in the micro-batch, the student's own log-prob of each sampled token at the rollout temperature
is computed from the student pass's hidden states (one more chunked matmul, no extra forward)
for the step runner's rollout-vs-trainer mismatch.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from megatron_opsd.algorithms.base import ForwardPass, LossInputs, LossOutput
from megatron_opsd.algorithms.opsd.diagnostics import divergence_diagnostics
from megatron_opsd.algorithms.opsd.loss import LossConfig, SampledLogprobs, Scratch, fused_token_divergence
from megatron_opsd.algorithms.opsd.teacher import Teacher, TeacherConfig, TeacherState
from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sample import ROLLOUT_LOGPROBS, Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.models.checkpoint import ShardedStateful
from megatron_opsd.models.lora import adapters_disabled, has_adapters
from megatron_opsd.section import Section


class OPSDConfig(Section):
    loss: LossConfig = Field(description="the divergence; loss.vocab_size defaults to the model's vocab_size")
    teacher: TeacherConfig = TeacherConfig()
    diagnostic_tokens: int = Field(
        32, ge=0, description="tokens per micro-batch on which top-1 agreement and clip fraction are measured; 0: off")


class OPSD:
    name = "opsd"
    rollouts_per_prompt = 1
    metric_sums = ("diag_agree", "diag_clipped", "diag_tokens")

    def __init__(self, cfg: OPSDConfig, chunks: Sequence[torch.nn.Module], prompts: PromptBuilder,
                 logprob_temperature: float):
        self.cfg = cfg
        self.chunks = list(chunks)
        self.prompts = prompts
        self.logprob_temperature = logprob_temperature  # the engine reports log-probs at the sampling temperature
        # With LoRA the teacher's own weights are the adapters' (the frozen base is shared), and the
        # fixed teacher is the base with every adapter off: no copy of anything.
        lora = has_adapters(self.chunks)
        trained = [p for c in self.chunks for p in c.parameters() if p.requires_grad or not lora]
        base = functools.partial(adapters_disabled, self.chunks) if lora else None
        self.teacher = Teacher(cfg.teacher, trained, base=base)
        self.scratch = Scratch()  # the loss's logits-sized blocks, kept for the run (on CPU)
        self.forward_passes = (ForwardPass("teacher", "teacher", self.teacher.weights_in_model, self.teacher.update),)

    def samples(self, problems: Sequence[Problem],
                rollouts: Sequence[Sequence[Sample]] | None) -> tuple[list[Sample], dict[str, float]]:
        return [dataclasses.replace(s, teacher_prompt_ids=tuple(self.prompts.teacher_ids(problem)))
                for problem, group in zip(problems, rollouts, strict=True) for s in group], {}

    def loss(self, inputs: LossInputs) -> LossOutput:
        student, weight, side = inputs.hidden, inputs.output_weight, inputs.micro_batch.student
        teacher_hidden, teacher_weight = inputs.passes["teacher"], self.teacher.weight_of(weight)
        cfg, group = self.cfg.loss, inputs.groups.tp
        targets = side.targets.to(student.device)
        # The rollouts' log-probs are compared with the student's, taken from the loss's own logits.
        sampled = SampledLogprobs(targets, self.logprob_temperature) \
            if ROLLOUT_LOGPROBS in inputs.micro_batch.per_token else None
        per_token = fused_token_divergence(
            student, teacher_hidden, weight, teacher_weight, cfg,
            target_ids=targets if cfg.sampled_token else None, group=group,
            # The output-weight gradient goes straight into DDP's fp32 main_grad (no extra buffer).
            main_grad_scale=inputs.grad_scale, sampled=sampled, scratch=self.scratch)
        sums = divergence_diagnostics(student.detach(), teacher_hidden, weight.detach(), teacher_weight, cfg, group,
                                      self.cfg.diagnostic_tokens)
        return LossOutput(per_token, sums, sampled.values if sampled is not None else None)

    def metrics(self, sums: Mapping[str, float], loss: float) -> dict[str, float]:
        diagnosed = max(sums["diag_tokens"], 1.0)
        return {"divergence": loss, "top1_agreement": sums["diag_agree"] / diagnosed,
                "clip_fraction": sums["diag_clipped"] / diagnosed}

    def states(self) -> dict[str, ShardedStateful]:
        return {"teacher": TeacherState(self.teacher, self.chunks)}
