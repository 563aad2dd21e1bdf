"""Weight sync into a fleet of two ``opsd serve`` stand-ins behind the real router, from a trainer
on two ranks (TP=2, PP=2): disk and distributed (gloo) deliver the trainer's tensors exactly; a
server that fails mid-bucket is poisoned, restarted from disk and serves the version; a wrong name
mapping is caught by the probe check; with LoRA adapters the servers get the merged weights.

Each check builds the run's components with the product's factory (``rollout.engine.kind:
sglang``), pushes one version, and reads every server's weights back with ``/get_weights_by_name``.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from megatron_opsd.rollout.engine import ProbeMismatchError
from megatron_opsd.rollout.sglang.client import Server
from megatron_opsd.rollout.sync.distributed import Bucket, DistributedSync, WeightGroupError
from megatron_opsd.train.components import Components, build_components
from tests.support.distributed import run_checks
from tests.workers.trainer_common import config, full_params, work_path

STAND_INS = ("rollout.engine={kind: sglang, servers: {count: 2, command: [python, -m, megatron_opsd.cli, serve]}, "
             "timeouts: {startup_s: 120, control_s: 120}}")


def _components(name: str, sync: str, *layout: str) -> Components:
    return build_components(config(STAND_INS, f"rollout.sync.kind={sync}", f"run_dir={work_path(name)}",
                                   "rollout.sync.bucket_mb=0.05", "rollout.sync.probe_tolerance=1e-4", *layout))


def _servers_hold_trainer_weights(c: Components, version: int) -> None:
    """On rank 0: every server reports ``version`` and holds exactly the trainer's tensors."""
    want = full_params(c)
    if dist.get_rank() != 0:
        return
    assert len(want) > 5, sorted(want)
    for server in c.engine.fleet.servers:
        assert server.weight_version() == str(version), (server.url, server.weight_version())
        for name, tensor in want.items():
            if name == "lm_head.weight" and c.hf_config.tie_word_embeddings:
                continue
            got = server.call("POST", "/get_weights_by_name", {"name": name, "truncate_size": tensor.numel()})
            torch.testing.assert_close(torch.tensor(got).reshape(tensor.shape), tensor.float(), rtol=0, atol=0,
                                       msg=lambda m, n=name, u=server.url: f"{u} {n}: {m}")


def _push_and_compare(name: str, sync: str, *layout: str) -> dict[str, float]:
    c = _components(name, sync, *layout)
    try:
        with torch.no_grad():  # weights the servers cannot already hold by chance
            for p in c.chunks[0].parameters():
                p.add_(0.01)
        metrics = c.weight_sync.push(version=5)
        _servers_hold_trainer_weights(c, 5)
        return metrics
    finally:
        if c.engine is not None:
            c.engine.close()


def check_disk_tp2():
    metrics = _push_and_compare("disk_tp2", "disk", "parallel.tp=2")
    assert metrics["weight_sync/servers_restarted"] == 0, metrics


def check_distributed_tp2():
    metrics = _push_and_compare("distributed_tp2", "distributed", "parallel.tp=2")
    assert metrics["weight_sync/servers_restarted"] == 0, metrics


def check_distributed_pp2():
    metrics = _push_and_compare("distributed_pp2", "distributed", "parallel.pp=2")
    assert metrics["weight_sync/servers_restarted"] == 0, metrics


LORA = "model.lora={r: 4, alpha: 8}"


def check_distributed_tp2_lora():
    """With LoRA adapters (non-zero after the nudge) every server holds the merged weights."""
    metrics = _push_and_compare("distributed_tp2_lora", "distributed", "parallel.tp=2", LORA)
    assert metrics["weight_sync/servers_restarted"] == 0, metrics


def check_disk_pp2_lora():
    metrics = _push_and_compare("disk_pp2_lora", "disk", "parallel.pp=2", LORA)
    assert metrics["weight_sync/servers_restarted"] == 0, metrics


class _FailsOnServer1(DistributedSync):
    """Server 1 is sent a name it does not have in the third bucket: it takes the broadcast, fails
    to load it and is left with partial weights, as a server that fails mid-update is."""

    fail = True

    def request_bucket(self, server: Server, bucket: Bucket, version: int) -> None:
        if self.fail and server is self.engine.fleet.servers[1] and bucket is self.buckets[2]:
            bucket = dataclasses.replace(bucket, names=("model.no_such_tensor", *bucket.names[1:]))
        super().request_bucket(server, bucket, version)


class _RefusesBeforeJoining(DistributedSync):
    """Server 1 is sent the bucket under a group it does not have: it answers 400 without joining the
    broadcast (as SGLang does for a missing group), while server 0 joins it."""

    fail = True

    def request_bucket(self, server: Server, bucket: Bucket, version: int) -> None:
        if self.fail and server is self.engine.fleet.servers[1]:  # answered with 400
            server.update_weights_from_distributed(list(bucket.names), list(bucket.dtypes),
                                                   [list(s) for s in bucket.shapes], "no-such-group", version)
        else:
            super().request_bucket(server, bucket, version)


class _MismatchedNCCL(DistributedSync):
    """The sender's broadcast fails to start as NCCL refuses ranks of different versions (the error
    text torch raises carries NCCL's last warning)."""

    def _broadcast(self, bucket: Bucket, tensors: list[torch.Tensor]) -> Exception:
        return RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1234, invalid usage, NCCL version 2.27.3\n"
                            "Last error:\nMismatched NCCL version detected : rank 1 version 22105 rank 0 version 22703")


class _SwapsTwoTensors(DistributedSync):
    """Sends two same-shaped tensors under each other's names: a wrong mapping that loads fine."""

    def request_bucket(self, server: Server, bucket: Bucket, version: int) -> None:
        names = list(bucket.names)
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        if gate in names and up in names:
            i, j = names.index(gate), names.index(up)
            names[i], names[j] = up, gate
        super().request_bucket(server, dataclasses.replace(bucket, names=tuple(names)), version)


def _with_sync(c: Components, cls: type[DistributedSync]) -> DistributedSync:
    s = c.weight_sync
    return cls(c.engine, c.chunks, s.probe, s.cfg, s.disk.root, s.disk.write_files, "127.0.0.1", s.timeout_s)


def check_failure_mid_bucket_restarts_that_server():
    c = _components("failure", "distributed", "parallel.pp=2", "rollout.sync.bucket_mb=0.02")
    try:
        sync = _with_sync(c, _FailsOnServer1)
        metrics = sync.push(version=3)
        assert metrics["weight_sync/servers_restarted"] == 1, metrics
        _servers_hold_trainer_weights(c, 3)
        metrics = sync.push(version=4)  # the groups are rebuilt, with the restarted server in them
        assert metrics["weight_sync/servers_restarted"] == 1, metrics  # it fails bucket 2 again, by design
        sync.fail = False
        assert sync.push(version=5)["weight_sync/servers_restarted"] == 0
        _servers_hold_trainer_weights(c, 5)
    finally:
        if c.engine is not None:
            c.engine.close()


def check_a_server_refusing_before_joining_cannot_hang_the_broadcast():
    """The whole model is one bucket, larger than a socket's buffers: the sender's broadcast cannot
    complete without server 1, which refused it. The push must not wait for the group's timeout
    (control_s 120 s): the refusal ends it, the broadcast is aborted, and the version goes by disk."""
    c = _components("refusal", "distributed", "parallel.tp=2", "rollout.sync.bucket_mb=64")
    try:
        sync = _with_sync(c, _RefusesBeforeJoining)
        assert len(sync_buckets(sync)) == 1
        start = time.monotonic()
        metrics = sync.push(version=2)
        assert time.monotonic() - start < 60, "the push waited for the weight group's timeout"
        assert metrics["weight_sync/servers_restarted"] == 1, metrics
        _servers_hold_trainer_weights(c, 2)
        sync.fail = False
        assert sync.push(version=3)["weight_sync/servers_restarted"] == 0  # the groups rebuilt, nothing stuck
        _servers_hold_trainer_weights(c, 3)
    finally:
        if c.engine is not None:
            c.engine.close()


def sync_buckets(sync: DistributedSync) -> list[Bucket]:
    """The sync's bucket plan (made at its first connection)."""
    sync._try_connect()
    return sync.buckets


def check_mismatched_nccl_versions_stop_the_run_on_every_rank():
    """Rebuilding the group cannot mend mismatched NCCL versions: the push raises on every rank,
    naming the cause, instead of sending this and every later version by disk."""
    _push_fails("nccl_versions", _MismatchedNCCL, WeightGroupError, "NCCL versions differ", "parallel.tp=2")


def check_wrong_mapping_is_caught_by_the_probe():
    _push_fails("wrong_mapping", _SwapsTwoTensors, ProbeMismatchError, "after weight sync 1", "parallel.tp=2",
                "rollout.sync.bucket_mb=1")


def _push_fails(name: str, cls: type[DistributedSync], error: type[Exception], says: str, *layout: str) -> None:
    """A push of version 1 by ``cls`` raises ``error`` saying ``says`` on every rank."""
    c = _components(name, "distributed", *layout)
    try:
        _with_sync(c, cls).push(version=1)
    except error as exc:
        assert says in str(exc), exc
    else:
        raise AssertionError(f"{cls.__name__}: the push did not raise {error.__name__}")
    finally:
        if c.engine is not None:
            c.engine.close()


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
