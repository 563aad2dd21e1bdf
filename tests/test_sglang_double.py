"""The SGLang contract both ways, against fixtures in SGLang 0.5.23's shapes (tests/fixtures/sglang):
the client builds and parses them, and ``opsd serve`` (in process, FastAPI's test client) answers
in them, with SGLang's status codes and blocking behaviour."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.sglang.client import Server
from megatron_opsd.rollout.sglang.double import Scheduler, build_app
from megatron_opsd.rollout.sglang.protocol import (
    MalformedReplyError,
    generate_request,
    parse_generate,
    parse_input_logprobs,
)
from tests.support.sglang_contract import assert_shape, fixture
from tests.support.tiny_models import save_tiny_model

KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("standin") / "hf")


@pytest.fixture
def served(model_dir):
    state = Scheduler(EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig(max_batch_size=8)), str(model_dir),
                    "0", max_batch_size=8, deterministic=True)
    with TestClient(build_app(state, KEY)) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, state


def body(prompt=(1, 2, 3), rid="r1", max_new_tokens=4, temperature=0.7, **extra):
    params = SamplingParams(temperature=temperature, top_p=0.95, top_k=20, max_new_tokens=max_new_tokens,
                            stop_token_ids=(2,))
    return {**generate_request(prompt, params, rid, seed=1234), **extra}


# -- the client's side --------------------------------------------------------------------------

def test_client_request_is_sglangs():
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=20, max_new_tokens=4, stop_token_ids=(2,))
    assert generate_request([11, 12, 13], params, "run-c000000-s000000-a01", seed=1234) == fixture("generate_request")


def test_client_parses_replies():
    stop = parse_generate(fixture("generate_reply"), "run-c000000-s000000-a01", 100, "s")
    assert (stop.response_ids, stop.logprobs, stop.finish_reason, stop.weight_version) == \
        ((31, 17, 2), (-0.0123, -1.52, -0.003), "stop", 7)
    assert parse_generate(fixture("generate_reply_length"), "run-c000000-s000001-a01", 100, "s").finish_reason == "length"
    assert parse_generate(fixture("generate_reply_abort"), "run-c000000-s000002-a01", 100, "s") is None
    assert parse_input_logprobs(fixture("generate_reply_input_logprobs"), "run-probe000001-0", [11, 12, 13, 14],
                                "s") == [-3.5, -0.75, -1.25]


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r.update(output_ids=[31, 17, 999]), r"output_ids \[999\] outside the vocabulary"),
    (lambda r: r["meta_info"]["output_token_logprobs"].pop(), "2 output_token_logprobs for 3 output_ids"),
    (lambda r: r["meta_info"].pop("finish_reason"), "finish_reason None is not stop, length or abort"),
    (lambda r: r["meta_info"].pop("weight_version"), "weight_version None is not an integer version"),
    (lambda r: r.pop("meta_info"), "not an object with meta_info"),
    (lambda r: r["meta_info"].update(id="other"), "the reply is for rid 'other'"),
])
def test_client_names_what_is_wrong_in_a_reply(corrupt, message):
    reply = fixture("generate_reply")
    corrupt(reply)
    with pytest.raises(MalformedReplyError, match=f"server-x rid r: .*{message}"):
        parse_generate(reply, "run-c000000-s000000-a01", 100, "server-x rid r")


# -- the stand-in's side ------------------------------------------------------------------------

def test_the_double_answers_in_sglangs_shapes(served, model_dir):
    client, _ = served
    reply = client.post("/generate", json=body(rid="run-c000000-s000000-a01"))
    assert reply.status_code == 200
    kind = reply.json()["meta_info"]["finish_reason"]["type"]
    assert_shape(reply.json(), fixture({"stop": "generate_reply", "length": "generate_reply_length"}[kind]), "generate")
    probe = client.post("/generate", json=body(rid="p", max_new_tokens=1, logprob_start_len=0)).json()
    assert_shape(probe, fixture("generate_reply_input_logprobs"), "generate(logprob_start_len=0)")
    assert probe["meta_info"]["input_token_logprobs"][0][0] is None
    batch = client.post("/generate", json={**body(), "input_ids": [[1, 2], [3, 4, 5]], "rid": ["a", "b"]}).json()
    assert [r["meta_info"]["id"] for r in batch] == ["a", "b"]
    for path, name in [("/model_info", "model_info"), ("/server_info", "server_info"), ("/v1/loads", "v1_loads")]:
        assert_shape(client.get(path).json(), fixture(name), path)
    for path in ("pause_generation", "continue_generation", "begin_weight_update", "end_weight_update"):
        f = fixture(path)
        assert_shape(client.post(f"/{path}", json=f["request"]).json(), f["reply"], path)
    f = fixture("end_weight_update")
    failure = client.post("/end_weight_update", json=f["request"])
    assert failure.status_code == 400 and failure.json().keys() == f["failure"].keys()
    f = fixture("update_weight_version")
    assert client.post("/update_weight_version", json=f["request"]).json() == f["reply"]
    assert client.get("/model_info").json()["weight_version"] == "7"
    assert client.post("/flush_cache").text == fixture("flush_cache")["ok"]
    f = fixture("destroy_weights_update_group")
    failure = client.post("/destroy_weights_update_group", json=f["request"])
    assert (failure.status_code, failure.json()) == (400, f["failure"])


def test_input_logprobs_ignore_the_requests_temperature_as_sglangs_do(served, model_dir):
    """SGLang's input log-probs are the raw logits' log_softmax; a sampled token's are at the temperature."""
    client, _ = served
    embedded = EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig())
    prompt = [5, 9, 3, 7, 11]
    want = embedded.logprobs([prompt], temperature=1.0)[0]
    sampled = {}
    for temperature in (0.5, 1.0, 1.3):
        reply = client.post("/generate", json=body(prompt, rid=f"t{temperature}", max_new_tokens=1,
                                                   temperature=temperature, logprob_start_len=0)).json()
        got = torch.tensor([lp for lp, _, _ in reply["meta_info"]["input_token_logprobs"][1:]])
        assert (got - want).abs().max() < 1e-5, temperature
        sampled[temperature] = reply["meta_info"]["output_token_logprobs"][0][0]
    assert len(set(sampled.values())) == 3  # the first new token's log-prob is at each request's temperature


def test_sampling_seeds_are_honoured_only_with_deterministic_inference(model_dir):
    """As SGLang: without --enable-deterministic-inference a request's sampling_seed is ignored; with it a
    request without one is seeded with 42."""
    def outputs(deterministic: bool, *seeds: int | None) -> list[list[int]]:
        state = Scheduler(EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig()), str(model_dir), "0", 8,
                        deterministic=deterministic)
        with TestClient(build_app(state, None)) as client:
            got = []
            for i, seed in enumerate(seeds):
                request = body((4, 8, 15), rid=f"r{i}", max_new_tokens=40, temperature=1.0)
                request["sampling_params"].pop("stop_token_ids")
                if seed is None:
                    request["sampling_params"].pop("sampling_seed")
                else:
                    request["sampling_params"]["sampling_seed"] = seed
                got.append(client.post("/generate", json=request).json()["output_ids"])
            return got

    seven, seven_again, unseeded, forty_two, eight = outputs(True, 7, 7, None, 42, 8)
    assert seven == seven_again and unseeded == forty_two and eight != seven
    first, second = outputs(False, 7, 7)
    assert first != second


def test_health_runs_a_generation_unless_sglangs_variable_says_not_to(model_dir, monkeypatch):
    """SGLang's /health answers 503 once its scheduler has been silent for SGLANG_HEALTH_CHECK_TIMEOUT (a
    pause, a weight load); with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 it answers whether the server is up."""
    monkeypatch.setenv("SGLANG_HEALTH_CHECK_TIMEOUT", "2")
    for generation, paused_status in (("1", 503), ("0", 200)):
        monkeypatch.setenv("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", generation)
        state = Scheduler(EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig()), str(model_dir), "0", 8)
        with TestClient(build_app(state, None)) as client:
            assert client.get("/health").status_code == 200
            client.post("/pause_generation", json={"mode": "abort"})
            start = time.monotonic()
            assert client.get("/health").status_code == paused_status, generation
            assert time.monotonic() - start < (5 if generation == "1" else 0.5)
            assert client.get("/health_generate").status_code == 503  # always the generation check
            client.post("/continue_generation", json={})
            assert client.get("/health").status_code == 200


def test_unknown_sampling_key_is_a_400(served):
    client, _ = served
    request = body()
    request["sampling_params"]["beam_width"] = 4
    reply = client.post("/generate", json=request)
    assert (reply.status_code, reply.json()) == (400, fixture("error_unknown_sampling_key"))


def test_every_endpoint_but_health_wants_the_key(model_dir):
    state = Scheduler(EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig()), str(model_dir), "0", 8)
    with TestClient(build_app(state, KEY)) as client:
        assert client.get("/health").status_code == 200  # as in SGLang: the router probes it without a key
        for method, path in [("POST", "/generate"), ("GET", "/model_info"), ("POST", "/pause_generation"),
                             ("POST", "/update_weights_from_disk"), ("POST", "/init_weights_update_group")]:
            reply = client.request(method, path, json={})
            assert (reply.status_code, reply.json()) == (401, fixture("unauthorized")), path
        wrong = client.get("/model_info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def _in_thread(fn):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, out


def test_generate_blocks_while_paused(served):
    client, _ = served
    assert client.post("/pause_generation", json={"mode": "abort"}).status_code == 200
    thread, out = _in_thread(lambda: client.post("/generate", json=body()))
    thread.join(1.0)
    assert thread.is_alive(), "a paused server answered a generate"
    client.post("/continue_generation", json={})
    thread.join(30)
    assert out["value"].status_code == 200
    assert out["value"].json()["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def _running(state: Scheduler) -> None:
    deadline = time.monotonic() + 30
    while not state.running:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


def test_abort_is_a_200_with_partial_tokens_and_flush_refuses_while_busy(served):
    client, state = served
    thread, out = _in_thread(lambda: client.post("/generate", json=body(rid="run-c1-s1", max_new_tokens=200)))
    _running(state)
    flush = client.post("/flush_cache")
    assert (flush.status_code, flush.text) == (400, fixture("flush_cache")["busy"])
    client.post("/abort_request", json={"rid": "run-c1-", "abort_all": False})  # by prefix
    thread.join(30)
    reply = out["value"].json()
    assert out["value"].status_code == 200
    assert_shape(reply, fixture("generate_reply_abort"), "aborted")
    assert reply["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(reply["output_ids"]) < 200


def test_retract_pause_restarts_running_requests_after_continue(served):
    client, state = served
    expected = client.post("/generate", json=body(rid="once", max_new_tokens=60, temperature=1.0)).json()
    thread, out = _in_thread(lambda: client.post("/generate", json=body(rid="twice", max_new_tokens=60,
                                                                        temperature=1.0)))
    _running(state)
    client.post("/pause_generation", json={"mode": "retract"})
    thread.join(0.5)
    assert thread.is_alive()
    client.post("/continue_generation", json={})
    thread.join(30)
    got = out["value"].json()
    assert got["output_ids"] == expected["output_ids"]  # the same seed: restarted, same rollout


def test_failed_disk_update_rolls_back(served, tmp_path):
    client, _ = served
    before = client.post("/generate", json=body(temperature=0.0)).json()["output_ids"]
    other = save_tiny_model("qwen3", tmp_path / "other", seed=5)
    tensors = {k: v for f in sorted(other.glob("*.safetensors")) for k, v in load_file(f).items()}
    tensors["model.norm.weight"] = torch.ones(3)  # every other tensor loads first, then this one fails
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    reply = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "bad"), "weight_version": "9"})
    assert reply.status_code == 400 and not reply.json()["success"]
    assert_shape(reply.json(), fixture("update_weights_from_disk")["failure"], "failure")
    assert "Rolling back" in reply.json()["message"]
    assert client.get("/model_info").json()["weight_version"] == "0"
    assert client.post("/generate", json=body(temperature=0.0)).json()["output_ids"] == before


def test_a_server_started_with_dummy_weights_loads_a_directory_only_with_a_load_format(model_dir):
    """SGLang defaults an update's load_format to the server's --load-format: with ``dummy`` it has
    no loader for a directory (found by vLLM, whose reload refuses the same; the client names ``auto``)."""
    state = Scheduler(EmbeddedEngine.from_pretrained(model_dir, EmbeddedEngineConfig()), str(model_dir), "0", 8,
                    load_format="dummy")
    with TestClient(build_app(state, None)) as client:
        reply = client.post("/update_weights_from_disk", json={"model_path": str(model_dir), "weight_version": "1"})
        assert reply.status_code == 400 and "Failed to get model loader" in reply.json()["message"]
        assert_shape(reply.json(), fixture("update_weights_from_disk")["failure"], "failure")
        sent = {}  # the client's request, posted to the same server
        server = Server("http://unused")
        server.call = lambda method, path, body=None, **_: sent.setdefault(path, body) and {"success": True}
        server.load_weights(str(model_dir), 1)
        ok = client.post("/update_weights_from_disk", json=sent["/update_weights_from_disk"])
        assert ok.json()["success"] and client.get("/model_info").json()["weight_version"] == "1"
