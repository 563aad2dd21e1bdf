"""One optimizer step of any algorithm over packed micro-batches: the shared step runner.

1. Each of the algorithm's forward passes (OPSD: the teacher) runs Megatron's pipeline schedule,
   forward only, under no_grad, with its weights in the model; on the last stage only the final
   hidden states of the response-predicting positions are kept, per micro-batch ([R, H]).
2. The student pass is the forward-backward schedule; the loss function on the last stage takes
   the student's hidden states at the same positions and calls ``Algorithm.loss`` with them, the
   forward passes' states and the output-layer shard.
3. The optimizer step is guarded: a non-finite loss or gradient norm skips the update (counted);
   ``StepConfig.max_consecutive_skips`` in a row raise ``NonFiniteError`` so the run stops before
   writing another checkpoint. After an applied step, each forward pass's ``after_step`` runs
   (OPSD's EMA teacher update).

Exact global token mean: the loss function returns (sum of per-token losses, token count) and the
model config has ``calculate_per_token_loss`` (``train/optim.wrap_for_training``), so Megatron
neither divides by the micro-batch count nor averages over DP; ``finalize_model_grads``
all-reduces the token count over DP and scales the gradients by 1 / (global response tokens).
The gradient is therefore the gradient of sum(all tokens) / N_global whatever the split.

Rollout-vs-trainer mismatch: when the micro-batches carry the rollouts' log-probs and the
algorithm returns the student's log-probs of the same tokens at the same temperature, the step
reports the mean and max of ``|delta log p|`` over all response tokens (with a weight sync every
k > 1 steps this includes the engine's staleness, which is what it should measure).

Metrics (identical on every rank): loss (mean per-token loss), token_loss_max, response_tokens,
grad_norm, lr, skipped / skipped_total, peak memory (the step's on a GPU, the process's RSS so
far on CPU), per-phase seconds and packed tokens/s,
the mismatch, and the algorithm's own (``Algorithm.metrics``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model
from pydantic import Field

from megatron_opsd.algorithms.base import Algorithm, ForwardPass, LossInputs
from megatron_opsd.data.packing import MicroBatch, PackedSequences
from megatron_opsd.data.sample import ROLLOUT_LOGPROBS
from megatron_opsd.parallel import all_reduce_stats
from megatron_opsd.platform import current_device, peak_memory_bytes, reset_peak_memory
from megatron_opsd.section import Section
from megatron_opsd.train.optim import guarded_step, zero_grads


class StepConfig(Section):
    max_consecutive_skips: int = Field(
        3, ge=1, description="stop after this many consecutive steps with a non-finite loss or gradient norm")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is untouched."""


@dataclass
class StepResult:
    applied: bool
    metrics: dict[str, float]


class PhaseTimer:
    """Wall time per named phase (synchronising the GPU so asynchronous kernels are attributed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _forward(side: PackedSequences, model: torch.nn.Module) -> torch.Tensor:
    """One packed row through this stage: [1, T, H] final hidden states on the last stage."""
    device = current_device()
    return model(side.tokens[None].to(device), side.position_ids[None].to(device), side.attention_mask(device),
                 output="hidden")


def _select(hidden: torch.Tensor, side: PackedSequences) -> torch.Tensor:
    """[1, T, H] -> [R, H]: the rows that predict the response tokens."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.predict_positions.to(hidden.device))


class StepRunner:
    """Runs steps of ``algorithm`` for fixed model chunks (DDP-wrapped), optimizer and scheduler,
    its collectives on the chunks' groups. Its skip counters are a checkpoint part (``state_dict``)."""

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer,
                 scheduler: OptimizerParamScheduler, algorithm: Algorithm, cfg: StepConfig | None = None):
        if len(chunks) != 1:
            raise ValueError("interleaved (virtual) pipeline stages are not supported: pass one chunk")
        self.chunks = list(chunks)
        self.model = unwrap_model(self.chunks[0])
        self.groups = self.model.groups
        if not self.chunks[0].config.calculate_per_token_loss:
            raise ValueError("wrap the model with train.optim.wrap_for_training (per-token loss normalisation)")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.algorithm = algorithm
        self.cfg = cfg if cfg is not None else StepConfig()  # a fresh default: StepConfig is mutable
        self.skipped_total = 0
        self.consecutive_skips = 0
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

    def forward_pass(self, spec: ForwardPass, batches: Sequence[MicroBatch]) -> list[torch.Tensor]:
        """The pass's hidden states [R_j, H] per micro-batch (last stage; empty list elsewhere)."""

        def keep(side: PackedSequences, hidden: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return _select(hidden, side)

        def forward_step(data_iterator, model):
            side = getattr(next(data_iterator), spec.side)
            return _forward(side, model), partial(keep, side)

        sides = [getattr(mb, spec.side) for mb in batches]
        with torch.no_grad(), spec.weights():
            return self._run_schedule(batches, [side.length for side in sides], forward_step, forward_only=True)

    def _loss(self, mb: MicroBatch, passes: dict[str, torch.Tensor], hidden: torch.Tensor):
        student = _select(hidden, mb.student)
        weight = self.model.output_weight()
        out = self.algorithm.loss(LossInputs(student, weight, mb, passes, float(self.optimizer.get_loss_scale()),
                                             self.groups))
        per_token = out.per_token
        total = per_token.sum()
        worst = per_token.detach().float().amax() if per_token.numel() else torch.tensor(-math.inf)
        stats = {"loss_sum": total.detach().float(), "loss_max": worst, **out.sums}
        rollout = mb.per_token.get(ROLLOUT_LOGPROBS)
        if rollout is not None:  # every stage and rank measures the mismatch when the samples are rollouts
            if out.sampled_logprobs is None:
                raise ValueError(f"algorithm {self.algorithm.name} returned no sampled_logprobs for rollouts")
            stats["logprob_abs_diff"] = (out.sampled_logprobs.cpu() - rollout).abs()
        return total, torch.tensor(per_token.numel(), dtype=torch.int), stats

    def student_pass(self, batches: Sequence[MicroBatch],
                     passes: dict[str, Sequence[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Forward-backward; gradients end up in the DDP grad buffers, scaled by 1 / global tokens."""
        last = self.groups.last_stage
        per_mb = [{name: states[j] for name, states in passes.items()} if last else {} for j in range(len(batches))]

        def forward_step(data_iterator, model):
            mb, states = next(data_iterator)
            return _forward(mb.student, model), partial(self._loss, mb, states)

        zero_grads(self.chunks, self.optimizer)
        return self._run_schedule(list(zip(batches, per_mb)), [mb.student.length for mb in batches], forward_step,
                                  forward_only=False)

    def accumulate_gradients(self, batches: Sequence[MicroBatch], timer: PhaseTimer | None = None) -> dict[str, float]:
        """The algorithm's forward passes, then the student pass: the step's gradients in the DDP
        buffers (no optimizer step). Returns the loss statistics reduced over ranks."""
        if not batches:
            raise ValueError("a step needs at least one micro-batch")
        timer = timer or PhaseTimer()
        passes = {}
        for spec in self.algorithm.forward_passes:
            with timer.phase(f"{spec.name}_pass"):
                passes[spec.name] = self.forward_pass(spec, batches)
        with timer.phase("student_pass"):
            per_mb = self.student_pass(batches, passes)
        del passes
        return self._reduce(per_mb, batches)

    def __call__(self, batches: Sequence[MicroBatch]) -> StepResult:
        """Forward passes, student pass, guarded optimizer step, pass updates; metrics on every rank.

        ``batches`` are this DP rank's micro-batches; every DP rank must pass the same number.
        """
        timer = PhaseTimer()
        reset_peak_memory()  # the step's own peak on a GPU
        stats = self.accumulate_gradients(batches, timer)
        tokens = max(stats["tokens"], 1.0)
        loss = stats["loss_sum"] / tokens
        applied, grad_norm = False, float("nan")
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(loss):
            with timer.phase("optimizer"):
                applied, grad_norm = guarded_step(self.optimizer, self.scheduler)
        if applied:
            for spec in self.algorithm.forward_passes:
                if spec.after_step is not None:
                    with timer.phase(f"{spec.name}_update"):
                        spec.after_step()
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
        metrics = {
            "loss": loss,
            "token_loss_max": stats["loss_max"],
            **self.algorithm.metrics({k: stats[k] for k in self.algorithm.metric_sums}, loss),
            "response_tokens": stats["tokens"],
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": float(not applied),
            "skipped_total": float(self.skipped_total),
            "peak_memory_bytes": float(peak_memory_bytes()),
            **{f"time/{k}": v for k, v in timer.seconds.items()},
        }
        # Packed tokens through this rank's stage per second.
        for spec in self.algorithm.forward_passes:
            tokens_through = sum(getattr(mb, spec.side).length for mb in batches)
            metrics[f"tokens_per_s/{spec.name}_pass"] = tokens_through / timer.seconds[f"{spec.name}_pass"]
        metrics["tokens_per_s/student_pass"] = sum(mb.student.length for mb in batches) / timer.seconds["student_pass"]
        if "mismatch_count" in stats:
            metrics["mismatch/logprob_abs_diff_mean"] = stats["mismatch_sum"] / max(stats["mismatch_count"], 1.0)
            metrics["mismatch/logprob_abs_diff_max"] = stats["mismatch_max"]
        if self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(last: loss={loss}, grad_norm={grad_norm}); stopping, the last good checkpoint is kept")
        return StepResult(applied, metrics)

    def _reduce(self, per_mb: list[dict[str, torch.Tensor]], batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Loss statistics from the last stage, summed over DP, then shared along the pipeline."""
        last = self.groups.last_stage
        keys = ("loss_sum", *self.algorithm.metric_sums)
        sums = {k: sum(float(d[k]) for d in per_mb) if last else 0.0 for k in keys}
        sums["tokens"] = float(sum(mb.num_response_tokens for mb in batches)) if last else 0.0
        maxes = {"loss_max": max((float(d["loss_max"]) for d in per_mb), default=-math.inf) if last else -math.inf}
        if ROLLOUT_LOGPROBS in batches[0].per_token:
            diffs = torch.cat([torch.zeros(0), *(d["logprob_abs_diff"] for d in per_mb)]) if last else torch.zeros(0)
            sums.update(mismatch_sum=float(diffs.sum()), mismatch_count=float(diffs.numel()))
            maxes["mismatch_max"] = float(diffs.max()) if diffs.numel() else 0.0
        sums, maxes = all_reduce_stats(sums, maxes, self.groups.dp)
        sums, maxes = all_reduce_stats(sums, maxes, self.groups.pp)
        return {**sums, **maxes}
