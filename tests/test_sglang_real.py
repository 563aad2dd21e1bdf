"""The same client, fleet and weight syncs against one real SGLang server (``tools/gpu_check.sh`` on
a CUDA machine with ``sglang`` installed; skipped elsewhere): its replies have the shapes of the
contract fixtures the stand-in is held to, its log-probs match the embedded engine's (prompt
log-probs at temperature 1, whatever the request's; sampled ones at the request's), seeds repeat
rollouts under --enable-deterministic-inference, and a disk and a distributed sync from a
one-process trainer deliver the trainer's weights, checked by the probe (SGLang's
``/get_weights_by_name`` does not serve Qwen3).

The server runs fp32 on the triton attention backend (Hopper's default, FA3, takes fp16/bf16/fp8
only). With one GPU the server shares it with the trainer and the weight group is gloo over CUDA
tensors (NCCL refuses two ranks on one GPU); with two, the server gets GPU 1 and the group is NCCL.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.engine import SGLangEngine
from megatron_opsd.rollout.sglang.fleet import Fleet
from tests.support.sglang_contract import assert_shape, fixture
from tests.support.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang installed")]
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() > 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("real") / "hf")


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    cfg = SGLangEngineConfig.model_validate({
        "kind": "sglang", "servers": {"count": 1, "mem_fraction": 0.3, "gpus": [1] if TWO_GPUS else [0],
                                      "deterministic_inference": True,
                                      "args": ["--dtype", "float32", "--attention-backend", "triton",
                                               "--disable-cuda-graph"]},
        "timeouts": {"startup_s": 600, "request_s": 120, "control_s": 300}})
    fleet = Fleet(cfg, tmp_path_factory.mktemp("real_logs"), api_key="gpu-check")  # the test's trainer: GPU 0
    fleet.start(str(model_dir), version=0)
    engine = SGLangEngine(fleet, cfg, vocab_size=1000, run_id="gpu")
    yield engine
    engine.close()


def test_real_replies_have_the_fixture_shapes(engine):
    server = engine.fleet.servers[0]
    for path, name in [("/model_info", "model_info"), ("/server_info", "server_info"), ("/v1/loads", "v1_loads")]:
        assert_shape(server.call("GET", path), fixture(name), path)
    body = fixture("generate_request")
    reply = server.call("POST", "/generate", body)
    kind = reply["meta_info"]["finish_reason"]["type"]
    assert_shape(reply, fixture({"stop": "generate_reply", "length": "generate_reply_length"}[kind]), "generate")
    for name in ("pause_generation", "continue_generation"):
        assert_shape(server.call("POST", f"/{name}", fixture(name)["request"]), fixture(name)["reply"], name)


def test_real_logprobs_match_the_embedded_engine(engine, model_dir):
    """Prompt log-probs at temperature 1 (SGLang ignores a request's temperature for them); a sampled
    token's at the request's, 0.8 and 1.3; the same seed, the same rollout. fp32 through triton's
    kernels agrees with the embedded engine to ~1e-3 (TF32 matmuls), not bitwise."""
    embedded = EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig())
    ids = [1, 5, 9, 3, 7, 2, 8, 4]
    assert (engine.logprobs([ids])[0] - embedded.logprobs([ids])[0]).abs().max() < 1e-2
    for temperature in (0.8, 1.3):
        params = SamplingParams(temperature=temperature, max_new_tokens=8, seed=1)
        (rollout,), = engine.generate([ids], params)
        assert len(rollout.response_ids) == len(rollout.logprobs)
        forced = embedded.logprobs([ids + list(rollout.response_ids)], temperature)[0][len(ids) - 1:]
        assert (torch.tensor(rollout.logprobs) - forced).abs().max() < 1e-2, temperature
        (again,), = engine.generate([ids], params)
        assert again.response_ids == rollout.response_ids  # --enable-deterministic-inference honours the seed


def test_disk_update_sets_the_version(engine, model_dir):
    assert engine.load_from_disk(model_dir, version=4) == []
    assert engine.fleet.servers[0].weight_version() == "4"


def test_distributed_sync_from_a_one_process_trainer(engine, tmp_path, model_dir):
    from transformers import AutoConfig

    from megatron_opsd.models import build_model
    from megatron_opsd.models.bridge import load_hf_weights
    from megatron_opsd.parallel import Layout, initialize
    from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
    from megatron_opsd.rollout.sync.distributed import DistributedSync

    groups = initialize(Layout())
    hf_config = AutoConfig.from_pretrained(model_dir)
    chunks = build_model(hf_config, torch.float32, groups=groups)
    load_hf_weights(chunks, model_dir)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.01)
    probe = ProbeCheck(chunks, list(range(1, 33)), 1.0, 1e-2, 1000)
    sync = DistributedSync(engine, chunks, probe,
                           SyncConfig(kind="distributed", bucket_mb=0.1, backend="nccl" if TWO_GPUS else "gloo"),
                           tmp_path, hf_config.save_pretrained, "127.0.0.1", 300)
    metrics = sync.push(version=6)
    assert metrics["weight_sync/servers_restarted"] == 0
    assert engine.fleet.servers[0].weight_version() == "6"
    assert metrics["probe/logprob_abs_diff_max"] < 1e-2  # the nudged weights, not the server's old ones
