"""Forward-only passes through Megatron's pipeline schedule (evaluation, verification, teacher)."""

from __future__ import annotations

from typing import Literal

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model
from torch import Tensor

from megatron_opsd.models.gpt import LlamaFamilyModel


@torch.no_grad()
def forward_only(
    chunks: list[LlamaFamilyModel],
    micro_batches: list[dict[str, Tensor]],
    *,
    output: Literal["logits", "hidden"] = "logits",
    gather_logits: bool = False,
) -> list[Tensor] | None:
    """Run micro-batches (dicts of ``input_ids``, ``position_ids``, ``attention_mask``, all of one
    shape) through all pipeline stages; the last stage gets one output per micro-batch, the other
    stages ``None``. Runs in eval mode without autograd; collective over the pipeline group."""
    batch, seq = micro_batches[0]["input_ids"].shape

    def step(data_iterator, model):
        mb = next(data_iterator)
        return model(
            mb["input_ids"], mb["position_ids"], mb["attention_mask"], output=output, gather_logits=gather_logits
        ), None

    training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    finally:
        for chunk, mode in zip(chunks, training, strict=True):
            chunk.train(mode)
    return list(outputs) if unwrap_model(chunks[-1]).groups.last_stage else None
