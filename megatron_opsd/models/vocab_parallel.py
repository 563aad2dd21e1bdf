"""Statistics of logits whose vocabulary is split over the tensor-parallel group, one stage each.

Each rank holds the columns of its output-layer shard; only per-token statistics cross the group
(a row's maximum, its exponentials' sum, a value at one global column), as in Megatron's
``vocab_parallel_cross_entropy``. ``group`` None (or of one rank) means no tensor parallelism.
These are the stages the fused OPSD loss and its diagnostics share
(``algorithms/opsd``); ``models/logprobs.py`` uses Megatron's cross-entropy, whose autograd the
log-probs of SFT and GRPO need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def row_max(z: Tensor) -> Tensor:
    """Max over the last dim; -inf for a shard with no columns (all padding)."""
    if z.shape[-1] == 0:
        return z.new_full(z.shape[:-1], -math.inf)
    return z.amax(dim=-1)


def local_column(index: Tensor, columns: int) -> tuple[Tensor, Tensor]:
    """(whether this shard holds each row's column ``index`` (local, out of range when another rank
    does), that index clamped into the shard's ``columns`` for a gather)."""
    return (index >= 0) & (index < columns), index.clamp(0, max(columns - 1, 0))


def values_at(z: Tensor, index: Tensor) -> Tensor:
    """Each row's value at its local column ``index``, 0 where another rank holds it (summing over
    the group gives the value)."""
    if not z.shape[1]:
        return z.new_zeros(z.shape[0])
    here, col = local_column(index, z.shape[1])
    return z.gather(1, col[:, None]).squeeze(1).masked_fill(~here, 0.0)


@dataclass(frozen=True)
class Normalized:
    """What :func:`log_softmax_pair_` leaves besides the log-softmax itself, per row, globally."""

    sums: Tensor      # [2, c]: sum of exp(z - max) over the vocabulary, student then teacher
    log_norm: Tensor  # [2, c]: max + log(sums), what was subtracted (less the max) from each row
    at: Tensor | None  # [2, c]: the log-probabilities at the requested columns, or None


def log_softmax_pair_(zs: Tensor, zt: Tensor, group: dist.ProcessGroup | None, exps: Tensor,
                      at: Tensor | None = None) -> Normalized:
    """Turn two row sets of this rank's columns (student ``zs``, teacher ``zt``, the same rows)
    into their vocab-parallel log-softmax, in place, with two all-reduces (``[2, c]`` and ``[2 or
    4, c]``). The exponentials are summed through ``exps`` (its rows at a time: a cache-sized tile,
    or a whole block, which then ends holding ``exp(zt - max)``: the teacher's softmax times
    ``sums[1]``). ``at``: one local column per row (out of range: another rank's), whose
    log-probabilities come back in ``Normalized.at``."""
    peak = torch.stack([row_max(zs), row_max(zt)])
    all_reduce(peak, dist.ReduceOp.MAX, group)
    zs.sub_(peak[0, :, None])
    zt.sub_(peak[1, :, None])
    sums, step = zs.new_empty(2, len(zs)), max(len(exps), 1)
    for r in range(0, len(zs), step):
        tile = exps[:min(step, len(zs) - r)]
        sums[0, r:r + step] = torch.exp(zs[r:r + step], out=tile).sum(dim=-1)
        sums[1, r:r + step] = torch.exp(zt[r:r + step], out=tile).sum(dim=-1)
    stats = torch.stack([*sums, values_at(zs, at), values_at(zt, at)] if at is not None else [*sums])
    all_reduce(stats, dist.ReduceOp.SUM, group)
    log_norm = stats[:2].log()
    zs.sub_(log_norm[0, :, None])
    zt.sub_(log_norm[1, :, None])
    return Normalized(stats[:2], log_norm, stats[2:] - log_norm if at is not None else None)


def target_logprobs(z: Tensor, local_target: Tensor, rescale: float, group: dist.ProcessGroup | None,
                    out: Tensor | None) -> Tensor:
    """``log_softmax(z * rescale)`` at each row's column ``local_target`` (out of range: another
    rank's), fp32 ``[c]`` (two all-reduces of ``[c]`` / ``[2, c]``); ``z`` is left as it is,
    ``out`` (a block of its shape) is worked in."""
    peak = row_max(z).mul_(rescale)
    all_reduce(peak, dist.ReduceOp.MAX, group)
    shifted = torch.mul(z, rescale, out=out) if out is not None else z * rescale
    shifted.sub_(peak[:, None])
    at = values_at(shifted, local_target) if z.shape[1] else torch.zeros_like(peak)
    stats = torch.stack([shifted.exp_().sum(dim=-1), at])
    all_reduce(stats, dist.ReduceOp.SUM, group)
    return (stats[1] - stats[0].log()).float()


def global_kth(values: Tensor, k: int, group: dist.ProcessGroup | None) -> Tensor:
    """k-th largest per row over all ranks, from each rank's local top values ``[c, <=k]``."""
    if group is not None and dist.get_world_size(group) > 1:
        padded = values.new_full((values.shape[0], k), -math.inf)
        padded[:, : values.shape[1]] = values
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, padded, group=group)
        values = torch.cat(parts, dim=1)
    return values.topk(k, dim=-1, sorted=True).values[:, -1]


def gather_vocab(logits: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """[k, V_local] shards of the TP group -> [k, V_padded]."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
