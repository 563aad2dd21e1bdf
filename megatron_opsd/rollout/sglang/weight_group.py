"""The process group over which weights are broadcast from a trainer rank to every TP rank of
every server, as SGLang's ``init_weights_update_group`` makes it.

Both sides build it the same way, so they meet: a TCP store at ``address:port`` hosted by the
sender (rank 0), a ``PrefixStore`` named after the group (one job may hold several groups: one
per pipeline stage), and a process group of ``backend`` (NCCL on GPUs, gloo on CPUs) that is not
the default group of either process. The sender is rank 0; a server's TP rank ``t`` is
``rank_offset + t``. The store is made directly rather than through ``torch.distributed``'s
``tcp://`` rendezvous, which under torchrun joins the launcher's store instead of hosting one.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist
from torch.distributed import TCPStore
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world


def init_weight_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str,
                      timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Join (rank 0: host) the group. gloo connects every pair now, so this blocks until all
    ``world_size`` members have joined; NCCL creates its communicator at the group's first
    collective, so this returns at once and the members meet there (no ``device_id`` is bound,
    which would make torch create it now)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # its ranks are its own, not the default group's
    return group


def destroy_weight_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)
