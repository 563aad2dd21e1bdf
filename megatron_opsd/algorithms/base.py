"""The algorithm protocol: what differs between OPSD, SFT (and later GRPO) in one training step.

The shared step runner (``train/step.py``) owns everything the algorithms have in common: it
runs each :class:`ForwardPass` through Megatron's schedule (forward only, no gradients) and
keeps the final hidden states of the response-predicting positions, runs the student
forward-backward whose loss function on the last pipeline stage calls :meth:`Algorithm.loss`,
turns the per-token losses into the exact global token mean, steps the optimizer (guarded
against non-finite values) and reduces the metrics. An algorithm says:

- which samples it trains on (:meth:`Algorithm.samples`), from the step's problems and, when
  ``rollouts_per_prompt > 0``, that many rollouts of each problem's student prompt;
- which extra forward passes it needs (``forward_passes``: OPSD's teacher; none for SFT);
- its per-token loss on the last stage, the metric sums it adds (``metric_sums``) and how they
  become metrics;
- the state it adds to a checkpoint (``states``: OPSD's teacher weights).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import Tensor

from megatron_opsd.data.packing import MicroBatch
from megatron_opsd.data.sample import Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.models.checkpoint import ShardedStateful, Stateful
from megatron_opsd.parallel import ParallelGroups


@dataclass(frozen=True)
class ForwardPass:
    """A forward-only pass of the model over one side of every micro-batch before the student
    pass; on the last stage its [R, H] hidden states reach the loss as ``LossInputs.passes[name]``.
    Its time is logged as ``time/<name>_pass``."""

    name: str
    side: Literal["student", "teacher"]
    weights: Callable[[], AbstractContextManager[None]]  # the weights the model holds during the pass
    after_step: Callable[[], None] | None = None  # after each applied optimizer step (e.g. an EMA update)


@dataclass(frozen=True)
class LossInputs:
    """What the loss of one micro-batch gets on the last pipeline stage."""

    hidden: Tensor            # [R, H] student final hidden states at the response-predicting positions
    output_weight: Tensor     # this TP rank's output-layer shard [V_local, H] (rows beyond the vocab: padding)
    micro_batch: MicroBatch
    passes: Mapping[str, Tensor]  # [R, H] hidden states of each forward pass, by name
    grad_scale: float         # the schedule backpropagates the loss's sum times this (the optimizer's loss scale)
    groups: ParallelGroups    # the loss's collectives run on groups.tp


@dataclass(frozen=True)
class LossOutput:
    """``per_token``: [R] fp32 losses of the micro-batch's response tokens (the step minimizes their
    mean over all tokens of the step). ``sums``: the algorithm's metric numerators (``metric_sums``),
    summed over micro-batches and ranks. ``sampled_logprobs``: the student's log-prob of each
    response token at the rollout temperature, compared with the rollout's own (when it has them)."""

    per_token: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)
    sampled_logprobs: Tensor | None = None


class Algorithm(Protocol):
    name: str
    rollouts_per_prompt: int  # 0: no rollouts (trains on reference solutions)
    forward_passes: Sequence[ForwardPass]
    metric_sums: Sequence[str]  # the keys of LossOutput.sums, the same on every rank and stage

    def samples(self, problems: Sequence[Problem],
                rollouts: Sequence[Sequence[Sample]] | None) -> tuple[list[Sample], dict[str, float]]:
        """The step's samples and what the algorithm measured making them (GRPO's rewards);
        ``rollouts[i]`` are problem i's rollouts (None without rollouts)."""

    def loss(self, inputs: LossInputs) -> LossOutput: ...

    def metrics(self, sums: Mapping[str, float], loss: float) -> dict[str, float]:
        """Algorithm metrics from the reduced ``metric_sums`` and the step's mean loss."""

    def states(self) -> dict[str, Stateful | ShardedStateful]:
        """The algorithm's own checkpoint parts, by name."""
