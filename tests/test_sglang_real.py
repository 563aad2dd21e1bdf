"""The same client, fleet and weight syncs against one real SGLang server (``tools/gpu_check.sh`` on
a CUDA machine with ``sglang`` installed; skipped elsewhere): its replies have the shapes of the
contract fixtures the stand-in is held to, its log-probs match the embedded engine's, and a disk
and a distributed (NCCL) sync from a one-process trainer deliver the trainer's tensors."""
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
from tests.test_sglang_standin import assert_shape, fixture
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang installed")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("real") / "hf")


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    cfg = SGLangEngineConfig.model_validate({
        "kind": "sglang", "servers": {"count": 1, "mem_fraction": 0.3,
                                      "args": ["--dtype", "float32", "--disable-cuda-graph"]},
        "timeouts": {"startup_s": 600, "request_s": 120, "control_s": 300}})
    fleet = Fleet(cfg, tmp_path_factory.mktemp("real_logs"), api_key="gpu-check")
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
    embedded = EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig())
    ids = [1, 5, 9, 3, 7, 2, 8, 4]
    got = engine.logprobs([ids], temperature=0.8)[0]
    want = embedded.logprobs([ids], temperature=0.8)[0]
    assert (got - want).abs().max() < 1e-3
    rollouts = engine.generate([ids], SamplingParams(temperature=0.8, max_new_tokens=8, seed=1))
    assert len(rollouts[0][0].response_ids) == len(rollouts[0][0].logprobs)


def test_disk_update_sets_the_version(engine, model_dir):
    assert engine.load_from_disk(model_dir, version=4) == []
    assert engine.fleet.servers[0].weight_version() == "4"


def test_distributed_sync_from_a_one_process_trainer(engine, tmp_path, model_dir):
    from transformers import AutoConfig

    from megatron_opsd.models import build_model
    from megatron_opsd.models.bridge import load_hf_weights, model_hf_tensors
    from megatron_opsd.parallel import Layout, initialize
    from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
    from megatron_opsd.rollout.sync.distributed import DistributedSync

    initialize(Layout())
    hf_config = AutoConfig.from_pretrained(model_dir)
    chunks = build_model(hf_config, torch.float32)
    load_hf_weights(chunks, model_dir)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.01)
    probe = ProbeCheck(chunks, list(range(1, 33)), 1.0, 1e-2, 1000)
    sync = DistributedSync(engine, chunks, probe, SyncConfig(kind="distributed", bucket_mb=0.1), tmp_path,
                           hf_config.save_pretrained, "127.0.0.1", 300)
    metrics = sync.push(version=6)
    assert metrics["weight_sync/servers_restarted"] == 0
    server = engine.fleet.servers[0]
    for name, tensor in model_hf_tensors(chunks):
        if name == "lm_head.weight":
            continue
        got = torch.tensor(server.call("POST", "/get_weights_by_name", {"name": name, "truncate_size": 64}))
        torch.testing.assert_close(got, tensor.reshape(-1)[:64].float().cpu(), rtol=0, atol=1e-6)
