"""``rollout.sync.kind: distributed``: the weights broadcast in buckets from each pipeline stage to
every TP rank of every server, over a process group per stage (NCCL on GPUs, gloo on CPUs).

Groups (once, at the first push): stage ``s``'s sender (``bridge.is_stage_sender``: its first TP
rank of data-parallel replica 0) is rank 0 of group ``opsd-pp_<s>-<nonce>`` and hosts its store;
server ``i``'s TP ranks are ``1 + sum(tp of servers before i) + tp_rank``. Rank 0 fires every
server's ``/init_weights_update_group`` while the sender joins (both block in the rendezvous).
Stages connect one after another, because a real server handles one control call at a time.

Per push: rank 0 pauses every server (abort mode), flushes and opens a weight-update session
(``/begin_weight_update``); then every bucket in turn, in the order the plan fixed at connect
time (each stage's tensors in module order, cut at ``bucket_mb``): rank 0 fires the bucket's
``/update_weights_from_distributed`` (names, dtypes, shapes, ``flattened_bucket``) at every
server, the stage's TP ranks gather the bucket's tensors and its sender broadcasts them as one
buffer. No rank ever holds more than its stage's tensors of one bucket. Then ``/end_weight_update``,
continue, and the versions are checked.

The broadcast is asynchronous and never waited on blindly: on a GPU a collective only enqueues,
and one that a server never joins (it refused the bucket first, or died) would block the next
device synchronisation until the group's timeout, when NCCL's watchdog ends the job. Instead
every trainer rank polls together (one small all-reduce per poll, ``settle``): the sender whether
its broadcast completed, rank 0 whether every server's call returned, until all succeeded, one
failed, or ``timeouts.control_s`` passed. On a failure the sender aborts its communicator before
anything waits on the device, and the servers still inside the broadcast are counted as failed.

A failure (a server that dies, refuses a bucket, or times out) stops the push at that bucket for
every rank at once. The servers may hold partial weights, so the version is written to disk
(``rollout.sync.dir``) and every server loads it, the ones that failed restarted from it; the
groups are rebuilt at the next push. Mismatched NCCL versions (NCCL refuses a communicator whose
ranks differ even by patch level) cannot be recovered by rebuilding: they stop the run
(:class:`WeightGroupError`).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model
from torch.distributed.distributed_c10d import _abort_process_group

from megatron_opsd.models.bridge import is_stage_sender, stage_hf_shapes, stage_hf_tensors
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.platform import current_device, free_port, port_available
from megatron_opsd.rollout.remote.engine import RemoteEngine
from megatron_opsd.rollout.remote.http import ServerError
from megatron_opsd.rollout.sglang.client import Server
from megatron_opsd.rollout.sglang.engine import SGLangEngine
from megatron_opsd.rollout.sglang.protocol import flatten_bucket
from megatron_opsd.rollout.sglang.weight_group import destroy_weight_group, init_weight_group
from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
from megatron_opsd.rollout.sync.disk import DiskSync

log = logging.getLogger(__name__)

NODE_ADDRESS_ENV = "OPSD_NODE_ADDRESS"  # this node's address on the job's fabric (set by the SLURM launcher)
NCCL_VERSION_MISMATCH = "Mismatched NCCL version"  # NCCL's init.cc, in the error torch raises
POLL_S = 0.005  # between two looks at a bucket's broadcast and the servers' replies
REFUSAL_GRACE_S = 10.0  # after a server failed a bucket, how long the broadcast may still take to complete


class WeightGroupError(RuntimeError):
    """A weight group that cannot work as the job is set up; retrying by disk every step would hide it."""


def nccl_environment() -> dict[str, str]:
    """What the trainer's process needs before its first NCCL communicator when it broadcasts
    weights to SGLang servers over NCCL: the ranks of one communicator on one node must agree on
    NCCL's cuMem allocator, and SGLang turns it off (``NCCL_CUMEM_ENABLE=0``) unless it is set.
    Servers started by the trainer inherit the trainer's value, as SLURM's steps inherit the job's."""
    return {"NCCL_CUMEM_ENABLE": "0"}


def nccl_version() -> str:
    """This process's NCCL version, as ``major.minor.patch`` ("none" for a torch built without NCCL)."""
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        return "none"


def sender_address(cfg: SyncConfig, host: str) -> str:
    """The address servers reach this node's senders at: ``rollout.sync.address``, else
    $OPSD_NODE_ADDRESS, else 127.0.0.1 for a fleet bound there, else this host's address."""
    return cfg.address or os.environ.get(NODE_ADDRESS_ENV) or (
        "127.0.0.1" if host in ("127.0.0.1", "localhost") else socket.gethostbyname(socket.gethostname()))


def sender_port(address: str, pinned: int | None, offset: int) -> int:
    """The port a sender hosts its group's rendezvous on: ``pinned + offset`` (``rollout.sync.port``)
    when it is free, else a free one: a group dropped after a failure may still hold it."""
    if pinned:
        if port_available(address, pinned + offset):
            return pinned + offset
        log.warning("port %d (rollout.sync.port + %d) is still held by an earlier weight group: using a free one",
                    pinned + offset, offset)
    return free_port(address)


def agree(ok_here: bool) -> bool:
    """Whether ``ok_here`` holds on every trainer rank (collective)."""
    flag = torch.tensor(0 if ok_here else 1, device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag)


@dataclass(frozen=True)
class Bucket:
    """The tensors of one broadcast: a slice of one stage's tensors, in order."""

    stage: int
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def plan_buckets(stages: Sequence[Sequence[tuple[str, tuple[int, ...]]]], dtype: torch.dtype,
                 bucket_bytes: int) -> list[Bucket]:
    """Each stage's (name, shape) list cut into buckets of at most ``bucket_bytes`` (a larger tensor
    is a bucket of its own), stage after stage."""
    dtype_name = str(dtype).removeprefix("torch.")
    buckets: list[Bucket] = []
    for stage, shapes in enumerate(stages):
        current: list[tuple[str, tuple[int, ...]]] = []
        size = 0
        for name, shape in shapes:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if current and size + nbytes > bucket_bytes:
                buckets.append(_bucket(stage, current, dtype_name))
                current, size = [], 0
            current.append((name, tuple(shape)))
            size += nbytes
        if current:
            buckets.append(_bucket(stage, current, dtype_name))
    return buckets


def _bucket(stage: int, items: list[tuple[str, tuple[int, ...]]], dtype: str) -> Bucket:
    return Bucket(stage, tuple(n for n, _ in items), (dtype,) * len(items), tuple(s for _, s in items))


@dataclass(frozen=True)
class Sender:
    """Where stage ``stage``'s sender hosts its group's rendezvous."""

    stage: int
    address: str
    port: int


class BroadcastSync:
    """What the broadcast syncs share: a push connects to the servers (the first time, and after a
    failure), sends, and on a failure has the version go by disk (``_recover``); then the probe check.
    ``engine`` is rank 0's, None elsewhere; ``host`` is the address the fleet binds (the default
    sender address follows it)."""

    def __init__(self, engine: RemoteEngine | None, chunks: Sequence[torch.nn.Module], probe: ProbeCheck,
                 cfg: SyncConfig, root: Path, write_files: Callable[[Path], None], host: str, timeout_s: float):
        self.engine, self.chunks, self.probe = engine, [unwrap_model(c) for c in chunks], probe
        self.cfg, self.timeout_s = cfg, timeout_s
        self.disk = DiskSync(engine, chunks, probe, root, cfg.keep_last, write_files)  # what a failed push falls back to
        self.address = sender_address(cfg, host)
        self.dtype = self.chunks[0].config.params_dtype
        self.connected = False
        self.abandoned: list[dist.ProcessGroup] = []  # gloo groups dropped mid-broadcast, destroyed at reconnection

    def _port(self, offset: int) -> int:
        return sender_port(self.address, self.cfg.port, offset)

    def _destroy_abandoned(self) -> None:
        """Destroy the groups dropped mid-broadcast: their servers were restarted since, which ended them."""
        for group in self.abandoned:
            try:
                destroy_weight_group(group)
            except Exception:  # a group broken beyond destroying: nothing is left to free
                log.warning("could not destroy an abandoned weight group", exc_info=True)
        self.abandoned = []

    def _forget_last_push(self) -> None:
        """Clear what a push records of its failures, before the next one."""

    def _requests_held(self) -> AbstractContextManager:
        """What holds for the whole of one push, from its connection to its recovery (vLLM: no
        generation request is sent while the servers' weights change)."""
        return nullcontext()

    def _connect(self) -> None:
        raise NotImplementedError

    def _send(self, version: int) -> bool:
        """Bring ``version`` to every server (collective); False when anything failed."""
        raise NotImplementedError

    def _recover(self, version: int) -> int:
        """Every server serves ``version`` from disk after a failure (collective); how many were restarted."""
        raise NotImplementedError

    def push(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        self._forget_last_push()
        with self._requests_held():
            healthy = broadcast_from_rank0(lambda: not self.engine.fleet.dead())
            sent = healthy and self._try_connect() and self._send(version)
            restarted = 0 if sent else self._recover(version)
        return {"time/weight_sync": time.perf_counter() - start, "weight_sync/servers_restarted": float(restarted),
                "probe/logprob_abs_diff_max": self.probe(self.engine, version)}

    def close(self) -> None:
        self.disk.close()

    def _try_connect(self) -> bool:
        if not self.connected:
            try:
                self._connect()
            except ServerError as exc:
                log.warning("%s; this version goes by disk", exc)
                return False
        return True

    def _fire(self, call: Callable[[Any, int], None]) -> list[tuple[int, Future]]:
        """Rank 0: ``call(server, index)`` on every server in threads, not waited for (the calls
        that join a collective return only once the trainer's side has joined it too). A new pool
        per call: a server that hangs past its timeout must not hold up the next call."""
        if self.engine is None:
            return []
        pool = ThreadPoolExecutor(len(self.engine.fleet.members))
        futures = [(m.index, pool.submit(call, m.server, m.index)) for m in self.engine.fleet.members]
        pool.shutdown(wait=False)
        return futures

    @staticmethod
    def _failed(pending: list[tuple[int, Future]]) -> set[int]:
        """The servers whose call in ``pending`` failed (each logged), once all have returned."""
        failed = set()
        for index, future in pending:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - logged; the push is recovered from disk
                log.warning("server %d: %s", index, exc)
                failed.add(index)
        return failed

    @staticmethod
    def _failed_so_far(pending: list[tuple[int, Future]]) -> set[int]:
        """The servers whose call in ``pending`` has already failed (each logged), without waiting."""
        return BroadcastSync._failed([(i, f) for i, f in pending if f.done() and f.exception() is not None])


class DistributedSync(BroadcastSync):
    """Bucketed broadcasts from every stage's sender to every server (``engine``: rank 0's, None
    elsewhere). ``host`` is the address the fleet binds (the default sender address follows it)."""

    def __init__(self, engine: SGLangEngine | None, chunks: Sequence[torch.nn.Module], probe: ProbeCheck,
                 cfg: SyncConfig, root: Path, write_files: Callable[[Path], None], host: str, timeout_s: float):
        super().__init__(engine, chunks, probe, cfg, root, write_files, host, timeout_s)
        self.backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        self.group: dist.ProcessGroup | None = None  # this rank's weight group (stage senders)
        self.senders: list[Sender] = []
        self.buckets: list[Bucket] = []
        self.tp_sizes: list[int] = []  # rank 0: each server's TP size (its /server_info)
        self.nonce = ""  # names this connection's groups
        self.failed: set[int] = set()  # rank 0: the servers that failed the current push
        self.stuck: set[int] = set()  # rank 0: of those, the ones still inside a broadcast (to be restarted)

    # -- groups ----------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Create every stage's weight group with every server (collective)."""
        if self.backend == "nccl":
            log.info("weight groups over NCCL %s (every server must run the same version)", nccl_version())
        self._destroy_abandoned()
        mine = None
        groups = self.chunks[0].groups
        if is_stage_sender(groups):
            stage = groups.pp_rank
            port = self._port(stage)
            mine = (Sender(stage, self.address, port),
                    stage_hf_shapes(self.chunks))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        stages = sorted((g for g in gathered if g is not None), key=lambda g: g[0].stage)
        self.senders = [sender for sender, _ in stages]
        self.buckets = plan_buckets([shapes for _, shapes in stages], self.dtype, int(self.cfg.bucket_mb * 2**20))
        if self.engine is not None:
            self.tp_sizes = [int(s.call("GET", "/server_info")["tp_size"]) for s in self.engine.fleet.servers]
        world, self.nonce = broadcast_from_rank0(lambda: (1 + sum(self.tp_sizes), secrets.token_hex(3)))
        for sender in self.senders:
            name = self.group_name(sender.stage)
            pending = self._fire(lambda server, i, s=sender, n=name: server.init_weights_update_group(
                s.address, s.port, 1 + sum(self.tp_sizes[:i]), world, n, self.backend))
            joined = True
            if mine is not None and mine[0].stage == sender.stage:
                try:
                    self.group = init_weight_group(self.backend, sender.address, sender.port, world, 0, name,
                                                   self.timeout_s)
                except Exception:  # every rank learns of it below
                    log.exception("stage %d: could not create weight group %s", sender.stage, name)
                    joined = False
            if not self._all_ok(joined, pending):
                raise ServerError(f"could not create weight group {name} with every server (sender "
                                  f"{sender.address}:{sender.port})")
        self.connected = True

    def group_name(self, stage: int) -> str:
        """Stage ``stage``'s group in this connection (a new name per connection: a server may still
        hold the group of one that failed)."""
        return f"opsd-pp_{stage}-{self.nonce}"

    def _all_ok(self, ok_here: bool, pending: list[tuple[int, Future]]) -> bool:
        """Whether this rank's part and (rank 0) every server call succeeded, on every rank
        (collective); the servers that failed join ``failed``."""
        failed = self._failed(pending)
        self.failed |= failed
        return agree(ok_here and not failed)

    def _disconnect(self) -> None:
        """Drop every weight group (after a failure): the next push builds them anew. Servers still
        inside a broadcast are not asked (their scheduler is blocked in it): they are restarted."""
        if self.group is not None:
            destroy_weight_group(self.group)
            self.group = None
        if self.engine is not None:
            answering = [m for m in self.engine.fleet.members if m.index not in self.stuck]
            for sender in self.senders:
                self.engine.each_server("destroy_weights_update_group", self.group_name(sender.stage),
                                        members=answering)
        self.connected = False

    # -- push ------------------------------------------------------------------------------------

    def _forget_last_push(self) -> None:
        self.failed, self.stuck = set(), set()

    def _send(self, version: int) -> bool:
        """Send every bucket (collective); False when a server or sender failed (the push stopped there)."""
        if not self._all_ok(True, self._fire(lambda server, _: _open_session(server))):
            return False
        my_stage = self.chunks[0].groups.pp_rank
        stream: Iterator | None = None
        for bucket in self.buckets:
            pending = self._fire(lambda server, _, b=bucket: self.request_bucket(server, b, version))
            work = None
            if bucket.stage == my_stage:
                stream = stream or stage_hf_tensors(self.chunks, self.dtype, placeholders=True)
                tensors = [tensor for _, (_, tensor) in zip(bucket.names, stream)]
                if self.group is not None:
                    work = self._broadcast(bucket, tensors)
            if not self.settle(work, pending):
                return False
        if self.engine is not None:
            self.engine.each_server("end_weight_update", check=True)
            self.engine.resume()
            self.engine.check_versions(version)
        return True

    def request_bucket(self, server: Server, bucket: Bucket, version: int) -> None:
        """One server's ``/update_weights_from_distributed`` of ``bucket``."""
        server.update_weights_from_distributed(list(bucket.names), list(bucket.dtypes),
                                               [list(s) for s in bucket.shapes], self.group_name(bucket.stage), version)

    def _broadcast(self, bucket: Bucket, tensors: list[torch.Tensor]) -> dist.Work | Exception:
        """The bucket's broadcast, started (not waited for); the exception when it could not start."""
        try:
            return dist.broadcast(flatten_bucket(tensors), group_src=0, group=self.group, async_op=True)
        except Exception as exc:  # every rank learns of it in settle; the push is recovered from disk
            log.exception("stage %d: the broadcast of a bucket of %d tensors failed", bucket.stage, len(tensors))
            return exc

    def settle(self, work: dist.Work | Exception | None, pending: list[tuple[int, Future]]) -> bool:
        """Whether this bucket reached every server (collective): ``work`` is this rank's broadcast
        (the stage's sender; None elsewhere), ``pending`` rank 0's calls to the servers. Polls both on
        every rank, every decision taken on the ranks' combined view (one all-reduce per poll), until
        all have ended. After a failure (a server's error, or the broadcast's), the others may still
        finish for ``REFUSAL_GRACE_S``: a server that took the bucket and failed to load it has let the
        broadcast complete, one that refused it before joining has not. Then, or after ``control_s``,
        the sender's communicator is aborted and the servers still inside their call join ``stuck``."""
        deadline = time.monotonic() + self.timeout_s
        failed_at, ended = None, None  # ended: (done, failed) of this rank's broadcast once it has ended
        while True:
            broadcast_done, broadcast_failed = ended or _work_state(work)
            if broadcast_done:
                ended = broadcast_done, broadcast_failed
            now = time.monotonic()
            state = torch.tensor([broadcast_failed or any(_failed(f) for _, f in pending),
                                  not broadcast_done or not all(f.done() for _, f in pending),
                                  now > deadline or (failed_at is not None and now - failed_at > REFUSAL_GRACE_S),
                                  _mismatched_nccl(work)], device=current_device())
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            failed, waiting, expired, mismatched = (bool(x) for x in state.tolist())
            if mismatched:
                said = f": {str(work).splitlines()[-1]}" if isinstance(work, Exception) else ""
                raise WeightGroupError(
                    f"the trainer's and the servers' NCCL versions differ (NCCL refuses such a communicator; the "
                    f"trainer has {nccl_version()}{said}): run both from one environment (the project's gpu "
                    f"extra), or use rollout.sync.kind=disk")
            if not waiting:
                self.failed |= self._failed(pending)
                return not failed
            if expired:
                self._give_up(work, pending)
                return False
            if failed and failed_at is None:
                failed_at = now
            time.sleep(POLL_S)

    def _give_up(self, work: dist.Work | Exception | None, pending: list[tuple[int, Future]]) -> None:
        """After a failed bucket: drop the sender's communicator (NCCL: aborted) if its broadcast is still
        under way (nothing has waited on it), and count every server that has not answered as failed."""
        if isinstance(work, dist.Work) and not work.is_completed() and self.group is not None:
            log.warning("dropping the weight group of this stage: its broadcast is still waiting for a server")
            if self.backend == "nccl":  # ends the pending collective; gloo's abort would wait for its timeout
                _abort_process_group(self.group)
            else:  # its pending send fails once the servers inside it are restarted; destroyed after that
                self.abandoned.append(self.group)
            self.group = None
        self.failed |= self._failed([(i, f) for i, f in pending if f.done()])
        self.stuck = {index for index, future in pending if not future.done()}
        self.failed |= self.stuck
        if self.stuck:
            log.warning("servers %s are still inside the broadcast: they are restarted", sorted(self.stuck))

    def _recover(self, version: int) -> int:
        """Every server loads ``version`` from disk, the failed ones restarted (collective); how many were."""
        self._disconnect()
        if self.engine is not None:  # a session left open (400 where none is)
            self.engine.each_server("end_weight_update", members=[m for m in self.engine.fleet.members
                                                                  if m.index not in self.stuck])
        return self.disk.deliver(version, poisoned=self.failed)[1]


def _work_state(work: dist.Work | Exception | None) -> tuple[bool, bool]:
    """(done, failed) of this rank's broadcast: ``None`` (no broadcast here) is done; an exception
    (it could not start) has failed; a completed one is waited for, which raises what it failed with."""
    if work is None:
        return True, False
    if isinstance(work, Exception):
        return True, True
    if not work.is_completed():
        return False, False
    try:
        work.wait()
    except Exception:  # every rank learns of it in settle
        log.exception("a weight broadcast failed")
        return True, True
    return True, False


def _failed(future: Future) -> bool:
    return future.done() and future.exception() is not None


def _mismatched_nccl(work: dist.Work | Exception | None) -> bool:
    return isinstance(work, Exception) and NCCL_VERSION_MISMATCH in str(work)


def _open_session(server: Server) -> None:
    server.pause("abort")
    server.flush_cache()
    server.begin_weight_update()
