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
import torch.distributed as dist
from megatron.core import parallel_state
from pydantic import Field

from megatron_opsd.algorithms.base import ForwardPass, LossInputs, LossOutput
from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sample import ROLLOUT_LOGPROBS, Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.fileio import CheckpointError
from megatron_opsd.models.checkpoint import ShardedStateful, shadow_sharded_state_dict
from megatron_opsd.models.lora import adapters_disabled, has_adapters
from megatron_opsd.opsd.loss import LossConfig, SampledLogprobs, dense_token_divergence, fused_token_divergence
from megatron_opsd.opsd.teacher import Teacher, TeacherConfig
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
        self.forward_passes = (ForwardPass("teacher", "teacher", self.teacher.weights_in_model, self.teacher.update),)

    def samples(self, problems: Sequence[Problem], rollouts: Sequence[Sequence[Sample]] | None) -> list[Sample]:
        return [dataclasses.replace(s, teacher_prompt_ids=tuple(self.prompts.teacher_ids(problem)))
                for problem, group in zip(problems, rollouts, strict=True) for s in group]

    def loss(self, inputs: LossInputs) -> LossOutput:
        student, weight, side = inputs.hidden, inputs.output_weight, inputs.micro_batch.student
        teacher_hidden, teacher_weight = inputs.passes["teacher"], self.teacher.weight_of(weight)
        cfg, group = self.cfg.loss, parallel_state.get_tensor_model_parallel_group()
        targets = side.targets.to(student.device)
        # The rollouts' log-probs are compared with the student's, taken from the loss's own logits.
        sampled = SampledLogprobs(targets, self.logprob_temperature) \
            if ROLLOUT_LOGPROBS in inputs.micro_batch.per_token else None
        per_token = fused_token_divergence(
            student, teacher_hidden, weight, teacher_weight, cfg,
            target_ids=targets if cfg.sampled_token else None, group=group,
            # The output-weight gradient goes straight into DDP's fp32 main_grad (no extra buffer).
            main_grad_scale=inputs.grad_scale, sampled=sampled)
        sums = divergence_diagnostics(student.detach(), teacher_hidden, weight.detach(), teacher_weight, cfg, group,
                                      self.cfg.diagnostic_tokens)
        return LossOutput(per_token, sums, sampled.values if sampled is not None else None)

    def metrics(self, sums: Mapping[str, float], loss: float) -> dict[str, float]:
        diagnosed = max(sums["diag_tokens"], 1.0)
        return {"divergence": loss, "top1_agreement": sums["diag_agree"] / diagnosed,
                "clip_fraction": sums["diag_clipped"] / diagnosed}

    def states(self) -> dict[str, ShardedStateful]:
        return {"teacher": TeacherState(self.teacher, self.chunks)}


class TeacherState:
    """The teacher's weights as a checkpoint part: the model's sharded tensors re-pointed at the
    teacher's (keys ``teacher.*``), so they reshard across layouts like the model; and its mode."""

    def __init__(self, teacher: Teacher, chunks: Sequence[torch.nn.Module]):
        self.teacher, self.chunks = teacher, chunks
        self._targets: dict[str, torch.Tensor] = {}

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        tensors = self.teacher.state_tensors()
        shards = {} if tensors is None else shadow_sharded_state_dict(self.chunks, self.teacher.params, tensors,
                                                                      prefix="teacher.")
        self._targets = {name: sh.data for name, sh in shards.items()}
        return {"mode": self.teacher.cfg.mode, "weights": shards}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.teacher.cfg.mode:
            raise CheckpointError(f"the checkpoint's teacher mode is {state['mode']!r}, the run's {self.teacher.cfg.mode!r}")
        for name, value in state["weights"].items():
            target = self._targets[name]
            if value.data_ptr() != target.data_ptr():  # torch_dist usually loads in place
                target.copy_(value)
        if self._targets:
            self.teacher.after_load()


@torch.no_grad()
def divergence_diagnostics(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    cfg: LossConfig,
    group: dist.ProcessGroup | None,
    max_tokens: int,
) -> dict[str, torch.Tensor]:
    """Teacher-student top-1 agreement and clipped-token count on up to ``max_tokens`` evenly spaced
    response tokens (counts; divide by ``diag_tokens``).

    A token counts as clipped when at least one vocabulary entry's term exceeded tau, i.e. its
    clipped divergence differs from the unclipped one. Full logits are gathered for these few
    tokens only, so the cost stays a small fraction of the loss.
    """
    n = student_hidden.shape[0]
    k = min(n, max_tokens)
    if k == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return {"diag_agree": zero, "diag_clipped": zero, "diag_tokens": zero}
    rows = torch.linspace(0, n - 1, k, device=student_hidden.device).long()
    unclipped = None if cfg.clip is None else cfg.model_copy(update={"clip": None})
    agree = clipped = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    for block in rows.split(8):  # a few [8, V] logits at a time
        zs, zt = (_gather_vocab(_logits(h[block], w), group)[:, : cfg.vocab_size]
                  for h, w in ((student_hidden, student_weight), (teacher_hidden, teacher_weight)))
        agree = agree + (zs.argmax(-1) == zt.argmax(-1)).sum()
        if unclipped is not None:
            clipped = clipped + (dense_token_divergence(zs, zt, cfg) < dense_token_divergence(zs, zt, unclipped)).sum()
    return {"diag_agree": agree.double().cpu(), "diag_clipped": clipped.double().cpu(),
            "diag_tokens": torch.tensor(float(k), dtype=torch.float64)}


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``hidden @ W^T``, the matmul in the weights' dtype like the loss's, formed as ``(W h^T)^T``:
    on CPU the output layer as the right-hand operand would be copied (packed) first."""
    return (weight @ hidden.to(weight.dtype).T).T.float()


def _gather_vocab(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[k, V_local] shards of the TP group -> [k, V_padded]."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
