"""One OPSD training step over packed micro-batches: teacher pass, student pass, optimizer.

Teacher pass: Megatron's pipeline schedule, forward only, under no_grad, with the teacher's weights
in the model (``Teacher.weights_in_model``). On the last pipeline stage only the final hidden
states of the response-predicting positions are kept, per micro-batch ([R, H], not [R, V]: V/H
times smaller; the loss recomputes teacher logits chunk by chunk from them and the teacher's
output-layer shard). Packing puts sample i in micro-batch j on both sides in the same order, so
row r of the teacher states and row r of the student states predict the same token.

Student pass: the forward-backward schedule; the loss function on the last stage gathers the
student's hidden states at the same response positions and calls ``fused_token_divergence`` with
the stored teacher states and both output-layer shards (the teacher's from ``Teacher.weight_of``).

Sampled-token log-probs (``logprob_temperature``): the student's log-prob of every response token
at the sampling temperature, from the student pass's own hidden states (one more chunked matmul,
no extra forward), returned per micro-batch so the loop can compare them with the rollout
engine's log-probs (rollout-vs-trainer mismatch).

Non-finite loss or gradient norm: the update is skipped (``train.optim.guarded_step``) and
counted; ``StepConfig.max_consecutive_skips`` in a row raise ``NonFiniteError`` so the run stops
before writing another checkpoint.

Metrics (identical on every rank): loss (= mean per-token divergence), token_loss_max,
top1_agreement and clip_fraction (on ``diagnostic_tokens`` sampled tokens per micro-batch),
response tokens, grad_norm, lr, skipped / skipped_total, peak memory, per-phase seconds and
tokens/s, plus the rollout statistics when the step's rollouts are passed.

Exact global token mean: the loss function returns (sum of per-token losses, token count) and the
model config has ``calculate_per_token_loss`` (``train/optim.wrap_for_training``), so Megatron
neither divides by the micro-batch count nor averages over DP; ``finalize_model_grads``
all-reduces the token count over DP and scales the gradients by 1 / (global response tokens).
The gradient is therefore the gradient of sum(all tokens) / N_global whatever the split.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model
from pydantic import Field

from megatron_opsd.data.packing import MicroBatch, PackedSequences, PackingConfig, pack_pairs, split_for_data_parallel
from megatron_opsd.data.prompts import SequencePair
from megatron_opsd.opsd.logprobs import token_logprobs
from megatron_opsd.opsd.loss import LossConfig, fused_token_divergence
from megatron_opsd.opsd.teacher import Teacher
from megatron_opsd.platform import current_device
from megatron_opsd.rollout.engine import Rollout
from megatron_opsd.section import Section
from megatron_opsd.train.metrics import (
    PhaseTimer,
    all_reduce_stats,
    divergence_diagnostics,
    peak_memory_bytes,
    rollout_stats,
)
from megatron_opsd.train.optim import guarded_step, zero_grads


class StepConfig(Section):
    max_consecutive_skips: int = Field(
        3, ge=1, description="stop after this many consecutive steps with a non-finite loss or gradient norm")
    diagnostic_tokens: int = Field(
        32, ge=0, description="tokens per micro-batch on which top-1 agreement and clip fraction are measured; 0: off")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is untouched."""


def data_parallel_share(pairs: Sequence[SequencePair]) -> list[int]:
    """Indices into ``pairs`` of this DP rank's share (token-balanced; the same on every rank)."""
    costs = [len(p.student_ids) + len(p.teacher_ids) for p in pairs]
    share = split_for_data_parallel(costs, parallel_state.get_data_parallel_world_size())
    return share[parallel_state.get_data_parallel_rank()]


def rank_micro_batches(pairs: Sequence[SequencePair], cfg: PackingConfig, pad_multiple: int = 1, pad_id: int = 0) -> list[MicroBatch]:
    """This DP rank's share of a step's pairs, packed; every DP rank gets the same micro-batch count
    (Megatron's schedules run in lockstep across DP), padding-only micro-batches where needed.
    ``MicroBatch.sample_ids`` index into the share (``data_parallel_share(pairs)``)."""
    mine = [pairs[i] for i in data_parallel_share(pairs)]
    batches = pack_pairs(mine, cfg, pad_multiple, pad_id)
    count = torch.tensor(len(batches), device=current_device())
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    if int(count) != len(batches):
        batches = pack_pairs(mine, cfg, pad_multiple, pad_id, num_micro_batches=int(count))
    return batches


@dataclass
class StepResult:
    applied: bool
    metrics: dict[str, float]
    # With ``logprob_temperature``: per micro-batch [R_j] student log-probs of the response tokens
    # (last pipeline stage; None elsewhere or when not requested).
    target_logprobs: list[torch.Tensor] | None = None


def _forward(side: PackedSequences, model: torch.nn.Module) -> torch.Tensor:
    """One packed row through this stage: [1, T, H] final hidden states on the last stage."""
    device = current_device()
    return model(side.tokens[None].to(device), side.position_ids[None].to(device),
                 side.attention_mask().to(device), output="hidden")


def _select(hidden: torch.Tensor, side: PackedSequences) -> torch.Tensor:
    """[1, T, H] -> [R, H]: the rows that predict the response tokens."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.predict_positions.to(hidden.device))


class OPSDStep:
    """Runs steps for fixed model chunks (DDP-wrapped), optimizer, scheduler and teacher."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        optimizer: MegatronOptimizer,
        scheduler: OptimizerParamScheduler,
        teacher: Teacher,
        loss_cfg: LossConfig,
        cfg: StepConfig | None = None,
        logprob_temperature: float | None = None,
    ):
        if len(chunks) != 1:
            raise ValueError("interleaved (virtual) pipeline stages are not supported: pass one chunk")
        self.chunks = list(chunks)
        self.model = unwrap_model(self.chunks[0])
        self.config = self.chunks[0].config
        if not self.config.calculate_per_token_loss:
            raise ValueError("wrap the model with train.optim.wrap_for_training (per-token loss normalisation)")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.teacher = teacher
        self.loss_cfg = loss_cfg
        self.cfg = cfg if cfg is not None else StepConfig()  # a fresh default: StepConfig is mutable
        self.logprob_temperature = logprob_temperature
        self.skipped_total = 0
        self.consecutive_skips = 0
        # Packed rows differ in length: let the pipeline schedule exchange activation shapes.
        self.config.variable_seq_lengths = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self._forward_backward = get_forward_backward_func()

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total, self.consecutive_skips = state["skipped_total"], state["consecutive_skips"]

    def _run_schedule(self, items: Sequence[Any], lengths: Sequence[int], forward_step, forward_only: bool) -> list:
        return self._forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(items),
            model=self.chunks,
            num_microbatches=len(items),
            seq_length=max(lengths),
            micro_batch_size=1,
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    def teacher_pass(self, batches: Sequence[MicroBatch]) -> list[torch.Tensor]:
        """Teacher hidden states [R_j, H] per micro-batch (last stage; empty list elsewhere)."""

        def keep(side: PackedSequences, hidden: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return _select(hidden, side)

        def forward_step(data_iterator, model):
            side = next(data_iterator).teacher
            return _forward(side, model), partial(keep, side)

        with torch.no_grad(), self.teacher.weights_in_model():
            return self._run_schedule(batches, [mb.teacher.length for mb in batches], forward_step, forward_only=True)

    def _loss(self, side: PackedSequences, teacher_hidden: torch.Tensor, hidden: torch.Tensor):
        student = _select(hidden, side)
        weight = self.model.output_weight()
        teacher_weight = self.teacher.weight_of(weight)
        group = parallel_state.get_tensor_model_parallel_group()
        per_token = fused_token_divergence(
            student, teacher_hidden, weight, teacher_weight, self.loss_cfg,
            target_ids=side.targets.to(student.device) if self.loss_cfg.sampled_token else None, group=group,
            # The schedule backpropagates per_token.sum() times the optimizer's loss scale, so the
            # output-weight gradient can go straight into DDP's fp32 main_grad (no extra buffer).
            main_grad_scale=float(self.optimizer.get_loss_scale()))
        total = per_token.sum()
        worst = per_token.detach().float().amax() if per_token.numel() else torch.tensor(-math.inf)
        stats = {"loss_sum": total.detach().float(), "loss_max": worst}
        stats.update(divergence_diagnostics(student.detach(), teacher_hidden, weight.detach(), teacher_weight,
                                            self.loss_cfg, group, self.cfg.diagnostic_tokens))
        if self.logprob_temperature is not None:
            with torch.no_grad():
                stats["target_logprobs"] = token_logprobs(
                    student.detach(), weight.detach(), side.targets.to(student.device), vocab_size=self.loss_cfg.vocab_size,
                    temperature=self.logprob_temperature, chunk_size=self.loss_cfg.chunk_size)
        return total, torch.tensor(per_token.numel(), dtype=torch.int), stats

    def student_pass(self, batches: Sequence[MicroBatch], teacher_hidden: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Forward-backward; gradients end up in the DDP grad buffers, scaled by 1 / global tokens."""
        last = parallel_state.is_pipeline_last_stage()
        items = list(zip(batches, teacher_hidden)) if last else [(mb, None) for mb in batches]

        def forward_step(data_iterator, model):
            mb, teacher = next(data_iterator)
            return _forward(mb.student, model), partial(self._loss, mb.student, teacher)

        zero_grads(self.chunks, self.optimizer)
        return self._run_schedule(items, [mb.student.length for mb in batches], forward_step, forward_only=False)

    def __call__(self, batches: Sequence[MicroBatch], rollouts: Sequence[Rollout] = (),
                 rollout_seconds: float | None = None) -> StepResult:
        """Teacher pass, student pass, guarded optimizer step, teacher update; metrics on every rank.

        ``batches`` are this DP rank's micro-batches; every DP rank must pass the same number.
        ``rollouts`` (the step's responses) and the time spent generating them add the rollout
        metrics (response length, truncation rate, rollout tokens/s).
        """
        if not batches:
            raise ValueError("a step needs at least one micro-batch")
        timer = PhaseTimer()
        with timer.phase("teacher_pass"):
            teacher_hidden = self.teacher_pass(batches)
        with timer.phase("student_pass"):
            per_mb = self.student_pass(batches, teacher_hidden)
        del teacher_hidden
        target_logprobs = [d.pop("target_logprobs") for d in per_mb] \
            if self.logprob_temperature is not None and parallel_state.is_pipeline_last_stage() else None
        stats = self._reduce(per_mb, batches)
        tokens = max(stats["tokens"], 1.0)
        loss = stats["loss_sum"] / tokens
        applied, grad_norm = False, float("nan")
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(loss):
            with timer.phase("optimizer"):
                applied, grad_norm = guarded_step(self.optimizer, self.scheduler)
        if applied:
            with timer.phase("teacher_update"):
                self.teacher.update()
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
        sampled = max(stats["diag_tokens"], 1.0)
        metrics = {
            "loss": loss,
            "token_loss_max": stats["loss_max"],
            "top1_agreement": stats["diag_agree"] / sampled,
            "clip_fraction": stats["diag_clipped"] / sampled,
            "response_tokens": stats["tokens"],
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": float(not applied),
            "skipped_total": float(self.skipped_total),
            "peak_memory_bytes": float(peak_memory_bytes()),
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            # Packed tokens through this rank's stage per second.
            "tokens_per_s/teacher_pass": sum(mb.teacher.length for mb in batches) / timer.seconds["teacher_pass"],
            "tokens_per_s/student_pass": sum(mb.student.length for mb in batches) / timer.seconds["student_pass"],
        }
        metrics.update(rollout_stats(rollouts))
        if rollouts and rollout_seconds:
            metrics["tokens_per_s/rollout"] = sum(len(r.response_ids) for r in rollouts) / rollout_seconds
        if self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(last: loss={loss}, grad_norm={grad_norm}); stopping, the last good checkpoint is kept")
        return StepResult(applied, metrics, target_logprobs)

    def _reduce(self, per_mb: list[dict[str, torch.Tensor]], batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Loss statistics from the last stage, summed over DP, then shared along the pipeline."""
        last = parallel_state.is_pipeline_last_stage()
        keys = ("loss_sum", "diag_agree", "diag_clipped", "diag_tokens")
        sums = {k: sum(float(d[k]) for d in per_mb) if last else 0.0 for k in keys}
        sums["tokens"] = float(sum(mb.num_response_tokens for mb in batches)) if last else 0.0
        maxes = {"loss_max": max((float(d["loss_max"]) for d in per_mb), default=-math.inf) if last else -math.inf}
        sums, maxes = all_reduce_stats(sums, maxes, parallel_state.get_data_parallel_group())
        sums, maxes = all_reduce_stats(sums, maxes, parallel_state.get_pipeline_model_parallel_group())
        return {**sums, **maxes}
