"""``rollout.sync.kind: distributed`` to vLLM servers: vLLM's weight-transfer protocol
(``--weight-transfer-config``, the dense ``nccl`` backend), driven for a whole fleet and every
pipeline stage.

vLLM's protocol has one sender, rank 0 of the transfer group; server ``i``'s workers are ranks
``1 + sum(world sizes of servers before i) + worker rank``. Here the sender is global rank 0 (stage
0's sender); connecting (once, at the first push) fires every server's
``/init_weight_transfer_engine`` while the sender joins (both block in the rendezvous).

Per push: rank 0 pauses every server (abort mode), flushes, ``/start_weight_update``; then, stage
after stage, rank 0 fires ``/update_weights`` with that stage's names, dtypes and shapes at every
server while the stage's TP ranks gather its tensors one at a time: rank 0 broadcasts each to the
servers, the stage's sender sending it to rank 0 first when it is another rank (one tensor in
flight, so no rank holds more than its stage's largest tensor). All trainer ranks agree (one
all-reduce) whether every server took the stage; then ``/finish_weight_update`` with the version,
continue, versions checked, the probe check.

Transports: ``nccl`` is vLLM's own (its ``StatelessProcessGroup`` rendezvous and NCCL communicator,
so the trainer's environment needs vllm); ``gloo`` is a gloo group the servers' worker extension
joins (backend ``opsd_gloo``: CPU servers), built as SGLang's weight groups are.

Every broadcast is started, then polled together with the servers' replies (rank 0 holds both):
on a GPU a broadcast that a server never joins would otherwise block the next device
synchronisation until NCCL's watchdog ends the job. A server's failed reply, or
``timeouts.control_s`` without the broadcast completing, aborts the communicator.

A failure after the update began (a server that dies, refuses, or times out; a broadcast that
fails) may leave every server with partial weights inside an open update: the version is written
to disk and every server is restarted from it; the transfer group is rebuilt at the next push.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_opsd.models.bridge import is_stage_sender, stage_hf_shapes, stage_hf_tensors
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.platform import current_device
from megatron_opsd.rollout.remote.http import ServerError
from megatron_opsd.rollout.sglang.weight_group import destroy_weight_group, init_weight_group
from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
from megatron_opsd.rollout.sync.distributed import (
    NCCL_VERSION_MISMATCH,
    POLL_S,
    BroadcastSync,
    WeightGroupError,
    agree,
    nccl_version,
)
from megatron_opsd.rollout.vllm.engine import VLLMEngine

log = logging.getLogger(__name__)

Shapes = list[tuple[str, tuple[int, ...]]]


class Transport(Protocol):
    """Rank 0 of a weight-transfer group: joins it, broadcasts to it."""

    def init_info(self) -> dict:
        """What the servers' backend needs beyond vLLM's NCCL init info."""

    def open(self, address: str, port: int, world_size: int) -> None: ...

    def broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        """Start broadcasting ``tensor``; returns whether it has completed (raising what it failed with)."""

    def abort(self) -> ProcessGroup | None:
        """End the group at once, a broadcast still under way (nothing has waited on it); a group
        that must be destroyed later, once its peers are restarted, is returned."""

    def close(self) -> None: ...


class NCCLTransport:
    """vLLM's: a ``StatelessProcessGroup`` this rank hosts and a ``PyNcclCommunicator`` over it."""

    def __init__(self, timeout_s: float):
        del timeout_s  # vLLM's trainer_init takes none: its rendezvous store waits its own 300 s
        self.comm = None

    def init_info(self) -> dict:
        return {}

    def open(self, address: str, port: int, world_size: int) -> None:
        try:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
        except ImportError as exc:
            raise ImportError("rollout.sync.kind=distributed to vLLM servers over NCCL joins vLLM's own rendezvous "
                              "and communicator: install the servers' vllm version in the trainer's environment "
                              "too (or use rollout.sync.kind=disk)") from exc
        log.info("vLLM weight transfer over NCCL %s (every server must run the same version)", nccl_version())
        try:
            self.comm = trainer_init({"master_address": address, "master_port": port, "world_size": world_size})
        except Exception as exc:
            if NCCL_VERSION_MISMATCH in str(exc):
                raise WeightGroupError(f"the trainer's NCCL ({nccl_version()}) and the vLLM servers' differ: NCCL "
                                       f"refuses such a communicator; run both from one environment, or use "
                                       f"rollout.sync.kind=disk ({exc})") from exc
            raise

    def broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        stream = torch.cuda.current_stream()
        sent = tensor.contiguous()
        self.comm.broadcast(sent, src=0, stream=stream)
        finished = torch.cuda.Event()
        finished.record(stream)
        return lambda: finished.query() and sent is not None  # holds the tensor (maybe the export's temporary)

    def abort(self) -> None:
        self.close()  # vLLM's destroy aborts the communicator (ncclCommAbort): nothing is left to destroy

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


class GlooTransport:
    """A gloo group named in the init info, joined by the ``opsd_gloo`` backend of the servers."""

    def __init__(self, timeout_s: float):
        self.group: dist.ProcessGroup | None = None
        self.timeout_s = timeout_s
        self.name = f"opsd-vllm-weights-{secrets.token_hex(3)}"

    def init_info(self) -> dict:
        return {"group_name": self.name, "timeout_s": self.timeout_s}

    def open(self, address: str, port: int, world_size: int) -> None:
        self.group = init_weight_group("gloo", address, port, world_size, 0, self.name, self.timeout_s)

    def broadcast(self, tensor: torch.Tensor) -> Callable[[], bool]:
        work = dist.broadcast(tensor.cpu().contiguous(), group_src=0, group=self.group, async_op=True)

        def finished() -> bool:
            if not work.is_completed():
                return False
            work.wait()  # raises what it failed with
            return True

        return finished

    def abort(self) -> ProcessGroup | None:
        """Not gloo's abort, which waits for the pending broadcast's timeout: the group is handed back
        (its broadcast fails once the servers inside it are restarted) to be destroyed after that."""
        group, self.group = self.group, None
        self._rename()
        return group

    def close(self) -> None:
        if self.group is not None:
            destroy_weight_group(self.group)
            self.group = None
        self._rename()

    def _rename(self) -> None:
        self.name = f"opsd-vllm-weights-{secrets.token_hex(3)}"  # a server may still hold the old group


TRANSPORTS: dict[str, Callable[[float], Transport]] = {"nccl": NCCLTransport, "gloo": GlooTransport}


class VLLMTransferSync(BroadcastSync):
    """Each version broadcast from rank 0 to every vLLM server (``engine``: rank 0's, None
    elsewhere); ``backend`` is the servers' (``servers.weight_transfer``), ``host`` the address the
    fleet binds (the default sender address follows it)."""

    def __init__(self, engine: VLLMEngine | None, chunks: Sequence[torch.nn.Module], probe: ProbeCheck,
                 cfg: SyncConfig, root: Path, write_files: Callable[[Path], None], host: str, backend: str,
                 timeout_s: float):
        super().__init__(engine, chunks, probe, cfg, root, write_files, host, timeout_s)
        self.transport = TRANSPORTS[backend](timeout_s)
        self.stages: list[Shapes] = []  # every stage's (name, shape) list, in stage order
        self.senders: list[int] = []  # every stage's sender's global rank
        self.opened = False  # an update was opened on the servers in this push

    def _forget_last_push(self) -> None:
        self.opened = False

    def _requests_held(self) -> AbstractContextManager:
        """No request is sent to the servers while their weights change (and a reply sampled
        across the change is asked again)."""
        return self.engine.syncing() if self.engine is not None else nullcontext()

    # -- the transfer group ----------------------------------------------------------------------

    def _connect(self) -> None:
        """Learn every stage's tensors and sender, and (rank 0) join every server (collective)."""
        groups = self.chunks[0].groups
        mine = (groups.pp_rank, dist.get_rank(), stage_hf_shapes(self.chunks)) if is_stage_sender(groups) else None
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        stages = sorted(g for g in gathered if g is not None)
        self.senders, self.stages = [rank for _, rank, _ in stages], [shapes for _, _, shapes in stages]
        if not broadcast_from_rank0(self._join_servers):  # rank 0's engine; mismatched NCCL raises on every rank
            raise ServerError(f"could not open a weight-transfer group with every server (sender {self.address})")
        self.connected = True

    def _join_servers(self) -> bool:
        """Rank 0: every server joins the group while this rank opens it; whether all did."""
        sizes = [server.world_size() for server in self.engine.fleet.servers]
        self._destroy_abandoned()
        port = self._port(0)
        world = 1 + sum(sizes)
        common = {"master_address": self.address, "master_port": port, "world_size": world,
                  "packed": False} | self.transport.init_info()
        pending = self._fire(lambda server, i: server.init_weight_transfer(common | {"rank_offset": 1 + sum(sizes[:i])}))
        try:
            self.transport.open(self.address, port, world)
        except WeightGroupError:
            raise
        except Exception:  # logged; this version goes by disk
            log.exception("could not open the weight-transfer group at %s:%d", self.address, port)
            return False
        return not self._failed(pending)

    def _disconnect(self) -> None:
        self.transport.close()
        self.connected = False

    # -- one push --------------------------------------------------------------------------------

    def _send(self, version: int) -> bool:
        """Every stage's tensors to every server (collective); False when anything failed."""
        ok = True
        self.opened = True
        if self.engine is not None:
            ok = not any(self.engine.each_server(method) for method in ("pause", "flush_cache", "start_weight_update"))
        if not agree(ok):
            return False
        for stage, shapes in enumerate(self.stages):
            pending = self._fire(lambda server, _, s=shapes: server.update_weights(
                [name for name, _ in s], [str(self.dtype).removeprefix("torch.")] * len(s), [list(sh) for _, sh in s]))
            ok = self._stream(stage, shapes, pending)
            ok = not self._failed(pending) and ok
            if not agree(ok):
                return False
        if self.engine is not None:
            self.engine.each_server("finish_weight_update", version, check=True)
            self.engine.each_server("flush_cache", check=True)
            self.engine.resume()
            self.engine.check_versions(version)
        return True

    def _stream(self, stage: int, shapes: Shapes, pending: list[tuple[int, Future]]) -> bool:
        """Stage ``stage``'s tensors, one at a time, to rank 0 and from it to the servers (rank 0's
        calls for the stage: ``pending``); whether this rank's part succeeded. Rank 0 keeps receiving
        after a failed broadcast, so a sender on another rank is never left blocked."""
        rank, sender = dist.get_rank(), self.senders[stage]
        ok = True

        def deliver(tensor: torch.Tensor) -> None:
            nonlocal ok
            if ok:
                try:
                    ok = self._completes(self.transport.broadcast(tensor), pending)
                except Exception:  # every rank learns of it; the push is recovered from disk
                    log.exception("the broadcast of a tensor of stage %d failed", stage)
                    ok = False

        if stage == self.chunks[0].groups.pp_rank:
            for _, tensor in stage_hf_tensors(self.chunks, self.dtype, placeholders=True):
                if rank == 0:
                    deliver(tensor)
                elif rank == sender:
                    dist.send(tensor.contiguous(), dst=0)
        elif rank == 0:
            for _, shape in shapes:
                received = torch.empty(shape, dtype=self.dtype, device=current_device())
                dist.recv(received, src=sender)
                deliver(received)
        return ok

    def _completes(self, finished: Callable[[], bool], pending: list[tuple[int, Future]]) -> bool:
        """Rank 0: whether a broadcast completes before any server's call fails and within ``control_s``;
        if not, the group is aborted (nothing has waited on the broadcast)."""
        deadline = time.monotonic() + self.timeout_s
        while not finished():
            if self._failed_so_far(pending) or time.monotonic() > deadline:
                log.warning("aborting the weight-transfer group: a server failed while a broadcast was under way")
                if (group := self.transport.abort()) is not None:
                    self.abandoned.append(group)
                return False
            time.sleep(POLL_S)
        return True

    def _recover(self, version: int) -> int:
        """Every server loads ``version`` from disk, all restarted once an update was opened on them
        (collective); how many were."""
        self._disconnect()
        poisoned = range(len(self.engine.fleet.members)) if self.engine is not None and self.opened else ()
        return self.disk.deliver(version, poisoned=poisoned)[1]
