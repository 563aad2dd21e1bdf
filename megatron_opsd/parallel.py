"""Parallel layout (TP / PP / CP / DP), its process groups, seeds, and the few collectives the
trainer shares between its parts.

Megatron keeps its process groups in the global ``megatron.core.parallel_state``. This module is
the only one that reads it: :func:`initialize` (re)builds the groups for a layout and returns them
as one :class:`ParallelGroups`, which is passed to whatever runs a collective (the model carries
its own, as Megatron-core modules carry a ``pg_collection``), so a unit can run on
:meth:`ParallelGroups.local` without initialising Megatron, and one process can switch layouts
(tests compare TP=1, TP=2 and PP=2 in one launch).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_opsd.config import LayoutError
from megatron_opsd.platform import Platform, current_device, init_process_group

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """Sizes of the parallel dimensions; ``dp`` is whatever the world size leaves."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise LayoutError(f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}: launch a "
                              f"multiple of {model_parallel} ranks, or change parallel.tp / parallel.pp")
        return world_size // model_parallel


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else group.rank()


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups of one layout (``None``: a dimension of one rank, no group) and
    Megatron's collection of them, which its modules take as ``pg_collection``."""

    layout: Layout = Layout()
    tp: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None  # the replicas of this rank's model shard
    cp: dist.ProcessGroup | None = None
    dp_cp: dist.ProcessGroup | None = None  # DP x CP: what the distributed optimizer shards over
    platform: Platform | None = None
    megatron: Any = field(default=None, repr=False)  # megatron.core's ProcessGroupCollection

    @classmethod
    def local(cls) -> ParallelGroups:
        """One process, no process group: for units that run without Megatron."""
        return cls()

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp)

    @property
    def tp_size(self) -> int:
        return group_size(self.tp)

    @property
    def pp_rank(self) -> int:
        return group_rank(self.pp)

    @property
    def pp_size(self) -> int:
        return group_size(self.pp)

    @property
    def dp_rank(self) -> int:
        return group_rank(self.dp)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp)

    @property
    def cp_size(self) -> int:
        return group_size(self.cp)

    @property
    def dp_cp_rank(self) -> int:
        return group_rank(self.dp_cp)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def initialize(layout: Layout = Layout(), seed: int = 1234) -> ParallelGroups:
    """Init the process group if needed, (re)build Megatron's groups for ``layout``, seed RNGs;
    the groups. ``seed`` is the data-parallel seed; Megatron derives the per-TP-rank seed for
    dropout in tensor-parallel regions from it (``model_parallel_cuda_manual_seed``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    platform = init_process_group()
    layout.dp(dist.get_world_size())
    if not platform.is_cuda and layout.cp > 1:
        raise LayoutError("context parallelism needs Transformer Engine attention (CUDA); use cp=1 on CPU")
    teardown()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
    )
    seed_all(seed)
    return ParallelGroups(layout, tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                          dp=ps.get_data_parallel_group(), cp=ps.get_context_parallel_group(),
                          dp_cp=ps.get_data_parallel_group(with_context_parallel=True), platform=platform,
                          megatron=ProcessGroupCollection.use_mpu_process_groups())


def teardown() -> None:
    """Drop Megatron's groups (the default process group stays)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's tensor-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def all_reduce_stats(sums: dict[str, float], maxes: dict[str, float],
                     group: dist.ProcessGroup | None) -> tuple[dict[str, float], dict[str, float]]:
    """Sum ``sums`` and max ``maxes`` over ``group`` in two collectives (fp64: token counts stay exact);
    ``None``: no group, the values as they are."""
    device = current_device()
    s = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    m = torch.tensor(list(maxes.values()), dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(s, group=group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(sums, s.tolist())), dict(zip(maxes, m.tolist()))


def broadcast_from_rank0(produce: Callable[[], T]) -> T:
    """``produce()`` on global rank 0, its result broadcast to every rank (collective).

    If it raises, every rank raises (rank 0 the original error, the others a RuntimeError naming
    it), instead of the others waiting for rank 0 in their next collective until the timeout.
    """
    return _on_rank0(produce, share_result=True)


def on_rank0(produce: Callable[[], T]) -> T | None:
    """``produce()`` on global rank 0 (None elsewhere): for what cannot be sent (an engine with its
    processes), with :func:`broadcast_from_rank0`'s rule that an error is raised on every rank."""
    return _on_rank0(produce, share_result=False)


def _on_rank0(produce: Callable[[], T], share_result: bool) -> T | None:
    payload: list[Any] = [None, None]
    error, result = None, None
    if dist.get_rank() == 0:
        try:
            result = produce()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error, payload[1] = exc, f"{type(exc).__name__} on rank 0: {exc}"
        payload[0] = result if share_result else None
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise RuntimeError(payload[1])
    return result if dist.get_rank() == 0 else payload[0]