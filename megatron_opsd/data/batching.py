"""Data-parallel batching: one step's samples split across DP ranks, each rank's share packed.

Every rank holds the whole step's samples (the rollouts are broadcast) and computes the same
split (``split_for_data_parallel`` balances tokens), then packs its own share. Megatron's
schedules need the same number of micro-batches on every DP rank: pack, all-reduce the maximum
count, and pack again with ``num_micro_batches`` set to it; every rank then gets exactly that
many (fuller micro-batches are split, a rank short of samples gets padding-only ones). The loss's
global token mean divides by the response-token count all-reduced over DP ranks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_opsd.data.packing import MicroBatch, PackingConfig, pack_samples
from megatron_opsd.data.sample import Sample, common_layout
from megatron_opsd.parallel import ParallelGroups
from megatron_opsd.platform import current_device


def split_for_data_parallel(costs: Sequence[int], dp_size: int) -> list[list[int]]:
    """Sample indices per DP rank, largest first onto the least-loaded rank (deterministic).

    Every rank computes the same split from the same global batch; ``costs`` is typically a
    sample's tokens over both sides.
    """
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0] * dp_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(dp_size), key=lambda r: (loads[r], r))
        ranks[r].append(i)
        loads[r] += costs[i]
    return [sorted(r) for r in ranks]


def data_parallel_share(samples: Sequence[Sample], groups: ParallelGroups) -> list[int]:
    """Indices into ``samples`` of this DP rank's share (token-balanced; the same split on every rank)."""
    costs = [len(s.student_ids) + len(s.teacher_ids or ()) for s in samples]
    return split_for_data_parallel(costs, groups.dp_size)[groups.dp_rank]


def rank_micro_batches(samples: Sequence[Sample], cfg: PackingConfig, groups: ParallelGroups, pad_multiple: int = 1,
                       pad_id: int = 0) -> list[MicroBatch]:
    """This DP rank's share of a step's samples, packed; every DP rank gets the same micro-batch
    count, padding-only micro-batches where needed (collective over ``groups.dp``).
    ``MicroBatch.sample_ids`` index into the share (``data_parallel_share(samples, groups)``)."""
    layout = common_layout(samples)
    mine = [samples[i] for i in data_parallel_share(samples, groups)]
    batches = pack_samples(mine, cfg, pad_multiple, pad_id, layout=layout)
    count = torch.tensor(len(batches), device=current_device())
    if groups.dp_size > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=groups.dp)
    if int(count) != len(batches):
        batches = pack_samples(mine, cfg, pad_multiple, pad_id, int(count), layout=layout)
    return batches
