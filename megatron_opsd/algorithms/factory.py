"""The ``algorithm`` config section and the one place algorithms are built from it.

``algorithm.name`` picks the algorithm; each has its own subsection (``algorithm.opsd``,
``algorithm.sft``, ``algorithm.grpo``), so one config file can hold the settings of every algorithm and a run can
switch with ``algorithm.name=sft`` on the command line.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from megatron_opsd.algorithms.base import Algorithm
from megatron_opsd.algorithms.grpo import GRPO, GRPOConfig
from megatron_opsd.algorithms.opsd import OPSD, OPSDConfig
from megatron_opsd.algorithms.sft import SFT, SFTConfig
from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.section import Section


class AlgorithmConfig(Section):
    name: Literal["opsd", "sft", "grpo"] = Field(
        default="opsd", description="opsd: on-policy self-distillation; sft: cross-entropy on reference solutions; "
        "grpo: group-normalized policy gradient on graded rollouts")
    opsd: OPSDConfig = Field(description="settings of algorithm opsd")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="settings of algorithm sft")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="settings of algorithm grpo")


def build_algorithm(cfg: AlgorithmConfig, chunks: Sequence[torch.nn.Module], prompts: PromptBuilder,
                    end_ids: Sequence[int], vocab_size: int, logprob_temperature: float) -> Algorithm:
    """The algorithm ``cfg.name`` names, over the (DDP-wrapped) model ``chunks``.

    ``end_ids`` end a reference response; ``logprob_temperature`` is the one the rollout engine
    reports its log-probs at."""
    if cfg.name == "opsd":
        return OPSD(cfg.opsd, chunks, prompts, logprob_temperature)
    if cfg.name == "grpo":
        return GRPO(cfg.grpo, prompts, vocab_size, logprob_temperature)
    return SFT(cfg.sft, prompts, end_ids, vocab_size)
