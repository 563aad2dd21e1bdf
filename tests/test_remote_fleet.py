"""What a fleet started here gets from the trainer's process, decided without GPUs or servers:
each server's own GPUs (never the trainer's), the environment its NCCL weight group needs, and a
sender port that a dropped weight group cannot block."""
from __future__ import annotations

import socket

import pytest

from megatron_opsd.config import ConfigError
from megatron_opsd.rollout.remote.fleet import place_servers, spawn
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sync.base import SyncConfig
from megatron_opsd.rollout.sync.distributed import sender_port
from megatron_opsd.rollout.sync.factory import process_environment
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig

EIGHT = [str(i) for i in range(8)]


def test_servers_get_gpus_after_the_trainers_each_its_own():
    assert place_servers(2, 2, None, EIGHT, trainer_gpus=4) == ["4,5", "6,7"]  # one 8-GPU node: trainer + fleet
    assert place_servers(1, 4, [2, 3, 6, 7], EIGHT, trainer_gpus=2) == ["2,3,6,7"]
    # indices name this process's visible devices: the servers get what CUDA_VISIBLE_DEVICES maps them to
    assert place_servers(2, 1, None, ["3", "5", "6"], trainer_gpus=1) == ["5", "6"]


@pytest.mark.parametrize(("count", "tp", "gpus", "trainer", "message"), [
    (2, 2, None, 6, r"2 server\(s\) of servers.tp=2 need 4 GPUs"),
    (1, 1, [0], 1, r"GPUs \[0\] are the trainer's \(its 1 rank\(s\) on this node use GPUs 0-0\)"),
    (1, 2, [5, 5], 1, "a GPU is listed twice"),
    (1, 1, [9], 1, r"GPUs \[9\] are not among this node's 8"),
])
def test_a_placement_that_cannot_work_says_why(count, tp, gpus, trainer, message):
    with pytest.raises(ConfigError, match=message):
        place_servers(count, tp, gpus, EIGHT, trainer_gpus=trainer)


def test_a_spawned_server_sheds_torchruns_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("KEPT", "1")
    process = spawn(["/bin/sh", "-c", "env"], tmp_path / "log", {"CUDA_VISIBLE_DEVICES": "4,5"})
    process.wait(30)
    seen = (tmp_path / "log").read_text().splitlines()
    assert "CUDA_VISIBLE_DEVICES=4,5" in seen and "KEPT=1" in seen
    assert not any(line.startswith(("TORCHELASTIC_", "LOCAL_RANK=")) for line in seen)


def test_the_trainer_turns_nccl_cumem_off_only_for_an_nccl_group_to_sglang():
    sglang = SGLangEngineConfig(kind="sglang")
    distributed = SyncConfig(kind="distributed")
    assert process_environment(distributed, sglang, cuda=True) == {"NCCL_CUMEM_ENABLE": "0"}  # as SGLang does
    assert process_environment(distributed.model_copy(update={"backend": "gloo"}), sglang, cuda=True) == {}
    assert process_environment(distributed, sglang, cuda=False) == {}  # gloo on CPUs
    assert process_environment(SyncConfig(kind="disk"), sglang, cuda=True) == {}
    vllm = VLLMEngineConfig(kind="vllm", servers={"weight_transfer": "nccl"})
    assert process_environment(distributed, vllm, cuda=True) == {}  # vLLM 0.32 keeps NCCL's default


def test_a_pinned_sender_port_that_is_still_held_gives_way_to_a_free_one():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert sender_port("127.0.0.1", port, 0) != port  # a dropped group's store still listens there
        assert sender_port("127.0.0.1", port - 1, 1) != port
    assert sender_port("127.0.0.1", port, 0) == port  # free again: the pinned one
