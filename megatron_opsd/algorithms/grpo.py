"""GRPO, the paper's RL baseline: n rollouts per problem, each rewarded by the grader ``opsd eval``
uses (its last ``\\boxed{}`` against the reference answer: 1 or 0), advantages normalized within
each problem's group, and the clipped policy-gradient loss on the trainer's log-probs of the
sampled tokens (vocab-parallel, from hidden states chunk by chunk: never [T, V] at once).

- Advantage of rollout i of a group: ``r_i - mean(r)``, divided by ``std(r) + 1e-4`` with
  ``std_normalize`` (TRL's and the paper's ``--scale_rewards group``; off: Dr. GRPO). A group whose
  rewards are all equal has advantage 0: no signal (``groups_without_signal`` counts them).
- Ratio ``exp(logp - logp_old)``: ``old: rollout`` takes the sampler's log-probs (the behaviour
  policy, so that a stale or numerically different sampler is corrected and clipped);
  ``old: current`` the trainer's own, detached (exactly on-policy: the ratio is 1, the clip
  inactive, the gradient ``-A * grad logp``: TRL's ``num_iterations=1``).
- Loss per token ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)``, no KL term. The step
  minimizes the mean over the step's tokens (``token_mean``) or, with ``sequence_mean``, the mean
  over rollouts of each rollout's token mean (TRL's ``grpo`` loss): every token is weighted by
  ``T / (N * len_i)`` (T tokens and N rollouts in the step), which the step's token mean turns into
  exactly that.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field

from megatron_opsd.algorithms.base import LossInputs, LossOutput
from megatron_opsd.config import ConfigError
from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sample import ROLLOUT_LOGPROBS, Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.eval.grader import grade
from megatron_opsd.models.logprobs import token_logprobs
from megatron_opsd.parallel import ParallelGroups
from megatron_opsd.section import Section

ADVANTAGE, TOKEN_WEIGHT = "advantage", "token_weight"


class GRPOConfig(Section):
    n: int = Field(default=8, ge=2, description="rollouts per problem (a group)")
    clip_eps: float = Field(default=0.2, gt=0, lt=1, description="the ratio's lower clip: 1 - clip_eps")
    clip_eps_high: float | None = Field(default=None, gt=0, description="upper clip 1 + this; None: clip_eps")
    std_normalize: bool = Field(default=True, description="divide advantages by the group's std (+1e-4)")
    aggregation: Literal["token_mean", "sequence_mean"] = Field(
        default="sequence_mean", description="loss mean over the step's tokens, or over rollouts of each one's token "
        "mean (TRL's grpo loss, the paper's baseline)")
    old: Literal["current", "rollout"] = Field(
        default="current", description="the ratio's old log-probs: the trainer's own (on-policy) or the sampler's")
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk of the log-probs' logits")


def group_advantages(rewards: Sequence[float], std_normalize: bool) -> list[float]:
    """``r - mean`` (``/ (std + 1e-4)``) within one group; all zeros when the rewards are equal."""
    mean = statistics.fmean(rewards)
    if std_normalize:
        std = statistics.pstdev(rewards)
        return [(r - mean) / (std + 1e-4) for r in rewards]
    return [r - mean for r in rewards]


def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantage: torch.Tensor,
                token_weight: torch.Tensor, old: torch.Tensor | None, cfg: GRPOConfig, *, vocab_size: int,
                temperature: float, groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss ``-min(ratio A, clip(ratio) A) * token_weight``, whether the clip decided it,
    the trainer's log-probs) for hidden states [N, H] and this TP rank's output shard [V_local, H];
    ``old`` None: the trainer's own log-probs, detached. Collective over ``groups.tp``."""
    logp = token_logprobs(hidden, weight, targets, vocab_size=vocab_size, groups=groups, temperature=temperature,
                          chunk_size=cfg.chunk_size)
    ratio = torch.exp(logp - (logp.detach() if old is None else old))
    high = cfg.clip_eps_high if cfg.clip_eps_high is not None else cfg.clip_eps
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - cfg.clip_eps, 1 + high) * advantage
    return -torch.minimum(unclipped, clipped) * token_weight, clipped < unclipped, logp


class GRPO:
    name = "grpo"
    forward_passes = ()
    metric_sums = ("clipped_tokens", "tokens")

    def __init__(self, cfg: GRPOConfig, prompts: PromptBuilder, vocab_size: int, logprob_temperature: float):
        self.cfg, self.prompts, self.vocab_size, self.temperature = cfg, prompts, vocab_size, logprob_temperature
        self.rollouts_per_prompt = cfg.n

    def samples(self, problems: Sequence[Problem],
                rollouts: Sequence[Sequence[Sample]] | None) -> tuple[list[Sample], dict[str, float]]:
        rewards, out, silent = [], [], 0
        for problem, group in zip(problems, rollouts, strict=True):
            if problem.answer is None:
                raise ConfigError(f"GRPO rewards need reference answers: problem at row {problem.index} has none "
                                  f"(data.fields.answer)")
            scores = [float(grade(self.prompts.tokenizer.decode(s.response_ids, skip_special_tokens=True),
                                  problem.answer).correct) for s in group]
            rewards += scores
            silent += len(set(scores)) == 1
            advantages = group_advantages(scores, self.cfg.std_normalize)
            out += [dataclasses.replace(s, token_extras={**s.token_extras, ADVANTAGE: (a,) * len(s.response_ids)})
                    for s, a in zip(group, advantages, strict=True)]
        tokens = sum(len(s.response_ids) for s in out)
        weights = [self._weight(s, tokens, len(out)) for s in out]
        out = [dataclasses.replace(s, token_extras={**s.token_extras, TOKEN_WEIGHT: (w,) * len(s.response_ids)})
               for s, w in zip(out, weights, strict=True)]
        return out, {"reward_mean": statistics.fmean(rewards), "groups_without_signal": silent / len(problems)}

    def _weight(self, sample: Sample, tokens: int, rollouts: int) -> float:
        return tokens / (rollouts * len(sample.response_ids)) if self.cfg.aggregation == "sequence_mean" else 1.0

    def loss(self, inputs: LossInputs) -> LossOutput:
        batch, device = inputs.micro_batch, inputs.hidden.device
        old = None
        if self.cfg.old == "rollout":
            if ROLLOUT_LOGPROBS not in batch.per_token:
                raise ValueError("grpo.old=rollout needs the rollouts' log-probs")
            old = batch.per_token[ROLLOUT_LOGPROBS].to(device)
        extras = batch.per_token
        per_token, clipped, logp = policy_loss(
            inputs.hidden, inputs.output_weight, batch.student.targets.to(device), extras[ADVANTAGE].to(device),
            extras[TOKEN_WEIGHT].to(device), old, self.cfg, vocab_size=self.vocab_size, temperature=self.temperature,
            groups=inputs.groups)
        sums = {"clipped_tokens": clipped.sum().float(), "tokens": torch.tensor(float(logp.numel()), device=device)}
        return LossOutput(per_token, sums, logp.detach())

    def metrics(self, sums: Mapping[str, float], loss: float) -> dict[str, float]:
        return {"clip_fraction": sums["clipped_tokens"] / max(sums["tokens"], 1.0)}

    def states(self) -> dict:
        return {}
