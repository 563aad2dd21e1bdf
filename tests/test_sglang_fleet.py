"""The SGLang engine over a real fleet: ``opsd serve`` stand-ins started as subprocesses behind the
real sglang-router. Same rollouts as the embedded engine for the same seeds; a server killed with
SIGKILL mid-batch loses and duplicates nothing and comes back with the current version; bad
replies fail with the server and rid named, after bounded retries; the router wants the key."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from megatron_opsd.platform import free_port
from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.engine import RolloutError, SGLangEngine
from megatron_opsd.rollout.sglang.fleet import Fleet, FleetError
from megatron_opsd.rollout.sglang.protocol import finish_reason, generate_reply
from tests.support.processes import processes_matching
from tests.support.tiny_models import save_tiny_model

STAND_IN = ["python", "-m", "megatron_opsd.cli", "serve"]
KEY = "fleet-test-key"
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=24, stop_token_ids=(2,), seed=11)


def fleet_config(**extra) -> SGLangEngineConfig:
    return SGLangEngineConfig.model_validate({
        "kind": "sglang", "servers": {"count": 2, "command": STAND_IN, "args": ["--max-running-requests", "4"],
                                       "deterministic_inference": True},
        "timeouts": {"startup_s": 120, "request_s": 60, "control_s": 60, "retries": 3}, **extra})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("fleet") / "hf")


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    fleet = Fleet(fleet_config(), tmp_path_factory.mktemp("fleet_logs"), KEY)
    fleet.start(str(model_dir), version=3)
    engine = SGLangEngine(fleet, fleet.cfg, vocab_size=1000, run_id="t", weight_version=3)
    engine.weights_dir = model_dir  # what a dead server restarts from
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def embedded(model_dir):
    return EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig(max_batch_size=4))


PROMPTS = [[1, 5, 9, 3], [7, 7, 2, 8, 4, 6], [3, 1], [9, 9, 9, 4, 2, 1, 5]]


def assert_same_rollouts(got: list[list[Rollout]], want: list[list[Rollout]]) -> None:
    assert [[r.response_ids for r in g] for g in got] == [[r.response_ids for r in g] for g in want]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
            assert a.finish_reason == b.finish_reason


def test_fleet_gives_the_embedded_engines_rollouts(engine, embedded):
    params = SamplingParams(**{**PARAMS.__dict__, "n": 3})
    got = engine.generate(PROMPTS, params)
    assert_same_rollouts(got, embedded.generate(PROMPTS, params))
    assert {r.weight_version for g in got for r in g} == {3}
    loads = [s.call("GET", "/v1/loads") for s in engine.fleet.servers]
    assert all(load["loads"][0]["num_running_reqs"] == 0 for load in loads)
    workers = engine.fleet.router.call("GET", "/workers")["workers"]
    assert sorted(w["url"] for w in workers) == sorted(engine.fleet.servers[i].url for i in range(2))
    probe = engine.logprobs([PROMPTS[1]])[0]
    assert (probe - embedded.logprobs([PROMPTS[1]])[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="temperature 1 only"):  # SGLang's prompt log-probs ignore temperature
        engine.logprobs([PROMPTS[1]], temperature=0.9)


def test_servers_answer_health_while_paused_so_the_router_keeps_them(engine):
    """A server the fleet starts has SGLang's generation health check off: paused (as for a long weight
    load) it still answers /health at once, so the router does not drop it."""
    for member in engine.fleet.members:
        environ = Path(f"/proc/{member.process.pid}/environ").read_bytes().split(b"\0")
        assert b"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0" in environ
    engine.each_server("pause", check=True)
    try:
        start = time.monotonic()
        assert all(server.healthy(timeout_s=2.0) for server in engine.fleet.servers)
        assert time.monotonic() - start < 2
    finally:
        engine.resume()
    assert all(w["is_healthy"] for w in engine.fleet.router.call("GET", "/workers")["workers"])


def test_server_killed_mid_batch_loses_and_duplicates_nothing(engine, embedded):
    prompts = [[1 + i % 7, 3, 5 + i % 5] for i in range(24)]
    params = SamplingParams(**{**PARAMS.__dict__, "max_new_tokens": 48, "stop_token_ids": (), "seed": 5})
    victim = engine.fleet.members[1]
    done: dict = {}
    thread = threading.Thread(target=lambda: done.setdefault("rollouts", engine.generate(prompts, params)))
    thread.start()
    deadline = time.monotonic() + 60
    while victim.server.call("GET", "/v1/loads")["loads"][0]["num_running_reqs"] == 0:
        assert time.monotonic() < deadline, "server 1 never got work"
        time.sleep(0.02)
    os.kill(victim.process.pid, signal.SIGKILL)
    thread.join(300)
    rollouts = done["rollouts"]
    assert len(rollouts) == 24 and all(len(g) == 1 for g in rollouts)  # one per sample: none lost, none doubled
    assert_same_rollouts(rollouts, embedded.generate(prompts, params))  # retries sample with the sample's seed
    assert not victim.alive()
    engine.restart_dead()  # before the next generate: restarted from the newest weights, routed again
    assert victim.alive() and victim.server.weight_version() == "3"
    again = engine.generate(PROMPTS, PARAMS)
    assert_same_rollouts(again, embedded.generate(PROMPTS, PARAMS))


def test_router_wants_the_key(engine):
    reply = httpx.post(f"{engine.fleet.router.url}/generate", json={"input_ids": [1, 2]}, timeout=10)
    assert reply.status_code == 401


def test_a_server_that_dies_while_starting_fails_at_once_with_its_log(model_dir, tmp_path):
    cfg = fleet_config(servers={"count": 1, "command": STAND_IN, "args": ["--tp-size", "2"]})
    start = time.monotonic()
    with pytest.raises(FleetError, match=r"(?s)server 0 .* exited with code 2 while starting.*--tp-size 2"):
        Fleet(cfg, tmp_path, None).start(str(model_dir), version=0)
    assert time.monotonic() - start < 60


# -- bad replies ----------------------------------------------------------------------------------

def _bad_server(mode: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.post("/generate")
    async def generate(request: Request):
        rid = (await request.json())["rid"]
        good = generate_reply(rid, [1], [5, 6], [-0.5, -0.25], finish_reason("stop", 6, 4), 0)
        if mode == "not_json":
            return PlainTextResponse("<html>bad gateway</html>")
        if mode == "out_of_vocab":
            good["output_ids"] = [5, 5000]
            good["meta_info"]["output_token_logprobs"][1][1] = 5000
        if mode == "lengths_differ":
            good["meta_info"]["output_token_logprobs"].pop()
        if mode == "missing_field":
            del good["meta_info"]["output_token_logprobs"]
        if mode == "slow":
            await asyncio.sleep(3)
        if mode == "error_500":
            return JSONResponse({"error": {"message": "CUDA error: an illegal memory access"}}, status_code=500)
        return good

    return app


@pytest.fixture(scope="module")
def bad_servers():
    """One uvicorn server per misbehaviour, in threads of this process."""
    urls, servers = {}, []
    for mode in ("not_json", "out_of_vocab", "lengths_differ", "missing_field", "slow", "error_500"):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(_bad_server(mode), host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        urls[mode] = f"http://127.0.0.1:{port}"
        servers.append(server)
    deadline = time.monotonic() + 30
    for url in urls.values():
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    yield urls
    for server in servers:
        server.should_exit = True


@pytest.mark.parametrize("mode, why", [
    ("not_json", "the reply is not JSON"), ("out_of_vocab", r"output_ids \[5000\] outside the vocabulary"),
    ("lengths_differ", "1 output_token_logprobs for 2 output_ids"),
    ("missing_field", "meta_info.output_token_logprobs is not a list"), ("slow", "ReadTimeout"),
    ("error_500", "HTTP 500: .*illegal memory access")])
def test_bad_reply_is_an_error_naming_server_and_rid_after_bounded_retries(bad_servers, tmp_path, mode, why):
    url = bad_servers[mode]
    cfg = fleet_config(urls=[url], router={"enabled": False},
                       timeouts={"startup_s": 10, "request_s": 1, "control_s": 10, "retries": 2})
    fleet = Fleet(cfg, tmp_path, None)
    fleet.start("unused", version=0)
    engine = SGLangEngine(fleet, cfg, vocab_size=1000, run_id="bad")
    with pytest.raises(RolloutError, match=rf"sample bad-c000000-s000000: no complete reply in 3 attempt\(s\): "
                                           rf"{url}.* rid bad-c000000-s000000-a01: .*{why}"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, seed=0))


# -- training through the fleet -------------------------------------------------------------------

def _fleet_rollout(sync: str) -> dict:
    return {"max_new_tokens": 12, "stop_tokens": ["<|im_end|>"],
            "engine": {"kind": "sglang", "servers": {"count": 2, "command": STAND_IN, "deterministic_inference": True},
                       "timeouts": {"startup_s": 120, "request_s": 60, "control_s": 60}},
            "sync": {"kind": sync, "probe_tolerance": 1e-3, "probe_tokens": 48, "bucket_mb": 0.1}}


def test_opsd_through_the_fleet_trains_as_with_the_embedded_engine(tmp_path, model_dir, capsys):
    """Same seeds, same rollouts, same losses, by disk and by broadcast; rollouts carry the version
    of the last sync; the run's files hold no API key and no server outlives the run."""
    from megatron_opsd.cli import main
    from megatron_opsd.tracking import read_metrics
    from tests.support.train_configs import losses, write_config

    assert main(["train", str(write_config(tmp_path / "embedded", model_dir))]) == 0
    want = read_metrics(tmp_path / "embedded" / "run" / "metrics.jsonl")
    for sync in ("disk", "distributed"):
        config = write_config(tmp_path / sync, model_dir, rollout=_fleet_rollout(sync))
        assert main(["train", str(config)]) == 0, capsys.readouterr().err
        run = tmp_path / sync / "run"
        got = read_metrics(run / "metrics.jsonl")
        assert losses(run) == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=1e-9), sync
        for key in ("response_len_mean", "eval/avg@1", "mismatch/logprob_abs_diff_max"):
            assert [r.get(key) for r in got] == pytest.approx([r.get(key) for r in want], abs=1e-5), (sync, key)
        assert all(r["probe/logprob_abs_diff_max"] < 1e-3 for r in got if "probe/logprob_abs_diff_max" in r)
        logs = (run / "rollout" / "logs").glob("*.log")
        assert not any("--api-key" in line and "***" not in line for f in logs for line in f.read_text().splitlines())
    assert sorted(p.name for p in (tmp_path / "disk" / "run" / "weights").iterdir()) == ["step_000002", "step_000003"]
    assert not processes_matching("megatron_opsd.cli serve", str(tmp_path))
