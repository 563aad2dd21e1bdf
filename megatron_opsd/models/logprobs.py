"""Log-probability of given next tokens from final hidden states and a vocab-parallel output layer.

Users: the SFT loss (``-log p(target)``, with gradients), GRPO's policy log-probs and the weight
sync's probe check. Logits are formed ``chunk_size`` tokens at a time and reduced across
tensor-parallel ranks by Megatron's ``vocab_parallel_cross_entropy``; padded vocabulary rows are
masked to -inf. Under autograd each chunk is recomputed in backward (activation checkpointing), so
no more than one ``[chunk_size, V_local]`` block of logits is alive at a time in either direction.

Why a second vocab-parallel log-prob exists (``models.vocab_parallel.target_logprobs``): the
OPSD loss needs the student's log-probs of the sampled tokens without gradients and without a
matmul of its own, from the logits block its pass has formed anyway, in place; this one needs
Megatron's cross-entropy backward and its own logits.
"""
from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint

from megatron_opsd.parallel import ParallelGroups


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                   groups: ParallelGroups, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """``log_softmax(hidden @ W^T / temperature)[target]`` per token: ``[N]`` fp32, the same on every TP rank.

    ``weight`` is this TP rank's output-layer shard ``[V_local, H]`` (rows ``rank * V_local ...``);
    rows at global index ``>= vocab_size`` are padding. ``targets`` are global token ids ``[N]``.
    Collective over ``groups.tp`` (Megatron's cross-entropy reads that group from its own state).
    Pass the plain replicated hidden states: their gradient comes back full (summed over the TP
    ranks' vocabulary shards).
    """
    rank = groups.tp_rank
    valid = max(0, min(weight.shape[0], vocab_size - rank * weight.shape[0]))

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = (h @ weight.T).float() / temperature
        if valid < logits.shape[1]:
            logits = logits.index_fill(1, torch.arange(valid, logits.shape[1], device=logits.device), -math.inf)
        return -vocab_parallel_cross_entropy(logits, t)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad and groups.tp_size > 1:
        # Each rank's logits see only its vocabulary shard: the hidden states' gradient is the sum
        # of every rank's part (ColumnParallelLinear's input does the same).
        hidden = copy_to_tensor_model_parallel_region(hidden, group=groups.tp)
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        parts.append(checkpoint(chunk, h, t, use_reentrant=False) if grad else chunk(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
