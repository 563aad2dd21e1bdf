"""The vLLM engine's side of ``/v1/completions`` without a server: the request it sends, the replies
it accepts, refuses (naming what is wrong) or asks again, and the config rules of ``kind: vllm``."""
from __future__ import annotations

import pytest

from megatron_opsd.config import ConfigError
from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.remote.fleet import FleetError, Member
from megatron_opsd.rollout.remote.replies import MalformedReplyError
from megatron_opsd.rollout.vllm.client import VLLMServer
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.engine import VLLMFleet
from megatron_opsd.rollout.vllm.protocol import completion_request, parse_completion, parse_prompt_logprobs
from tests.support.train_configs import REPO, load_train

FULL = SamplingParams(temperature=0.8, top_p=1.0, top_k=-1, max_new_tokens=4, stop_token_ids=(2,), seed=1)
CUT = SamplingParams(temperature=0.8, top_p=0.95, top_k=20, max_new_tokens=4, stop_token_ids=(2,), seed=1)


def reply(ids=(5, 6, 2), finish="stop", logprobs=(-1.0, -2.0, -0.5), request_id="r-a01"):
    return {"id": f"cmpl-{request_id}", "choices": [{
        "index": 0, "text": "", "token_ids": list(ids), "finish_reason": finish,
        "logprobs": None if logprobs is None else {"token_logprobs": list(logprobs)}}]}


def test_request_asks_for_what_the_contract_needs():
    body = completion_request([1, 2, 3], FULL, "r-a01", seed=7)
    wanted = {"prompt": [1, 2, 3], "max_tokens": 4, "stop_token_ids": [2], "ignore_eos": True, "return_token_ids": True,
              "request_id": "r-a01", "seed": 7, "logprobs": 0, "top_k": -1, "temperature": 0.8}
    assert {key: body[key] for key in wanted} == wanted
    assert completion_request([1], CUT, "r", seed=None)["logprobs"] is None
    assert completion_request([1], SamplingParams(temperature=0.0, top_k=20), "r", seed=None)["logprobs"] == 0


def test_replies_become_rollouts_or_are_asked_again():
    rollout = parse_completion(reply(), "r-a01", FULL, 10, 4, "s")
    assert (rollout.response_ids, rollout.logprobs, rollout.finish_reason, rollout.weight_version) == (
        (5, 6, 2), (-1.0, -2.0, -0.5), "stop", 4)
    assert parse_completion(reply(finish="abort"), "r-a01", FULL, 10, 4, "s") is None
    assert parse_completion(reply(logprobs=None), "r-a01", CUT, 10, 4, "s").logprobs is None
    assert parse_completion(reply(ids=(5, 6, 7), finish="length"), "r-a01", FULL, 10, 4, "s").finish_reason == "length"


@pytest.mark.parametrize("bad, why", [
    (reply(request_id="other"), "the reply is for request 'cmpl-other'"),
    ({"choices": []}, "the reply is not an object with one choice"),
    (reply(finish=None), "finish_reason None is not stop, length or abort"),
    (reply(ids=()), "token_ids is not a non-empty list"),
    (reply(ids=(5, 60, 2)), r"token_ids \[60\] outside the vocabulary \[0, 10\)"),
    (reply(ids=(5, 6, 7)), "finish_reason stop, but the last token 7 is no stop token"),
    (reply(logprobs=(-1.0,)), "logprobs.token_logprobs is not one number per token"),
    (reply(logprobs=None), "logprobs.token_logprobs is not one number per token"),
])
def test_malformed_replies_are_errors_naming_server_and_request(bad, why):
    with pytest.raises(MalformedReplyError, match=rf"^http://s:1 request r-a01: {why}"):
        parse_completion(bad, "r-a01", FULL, 10, 4, "http://s:1 request r-a01")


def test_prompt_logprobs_are_read_per_position():
    prompt = [3, 4, 5]
    good = {"id": "cmpl-p", "choices": [{"prompt_logprobs": [None, {"4": {"logprob": -1.5, "rank": 3}},
                                                            {"5": {"logprob": -0.25, "rank": 1}}]}]}
    assert parse_prompt_logprobs(good, "p", prompt, "s") == [-1.5, -0.25]
    good["choices"][0]["prompt_logprobs"][2] = {"9": {"logprob": -0.1}}
    with pytest.raises(MalformedReplyError, match=r"prompt_logprobs\[2\] has no log-prob of token 5"):
        parse_prompt_logprobs(good, "p", prompt, "s")


def test_config_rules_of_the_vllm_engine():
    example = REPO / "examples" / "tiny_cpu_vllm.yaml"
    cfg = load_train(example)
    assert cfg.rollout.engine.kind == "vllm" and cfg.rollout.engine.fleet_size == 2
    with pytest.raises(ConfigError, match="rollout.engine.kind=vllm needs rollout.sync.kind disk or distributed"):
        load_train(example, "rollout.sync.kind=inprocess")
    with pytest.raises(ConfigError, match="needs rollout.engine.servers.weight_transfer"):
        load_train(example, "rollout.sync.kind=distributed")
    with pytest.raises(ConfigError, match="rollout.sync.backend=nccl differs from the servers'"):
        load_train(example, "rollout.sync.kind=distributed", "rollout.engine.servers.weight_transfer=gloo",
                   "rollout.sync.backend=nccl")
    load_train(example, "rollout.sync.kind=distributed", "rollout.engine.servers.weight_transfer=gloo")
    with pytest.raises(ConfigError, match="vLLM reports them only without top-k / top-p"):
        load_train(example, "algorithm.name=grpo", "algorithm.grpo.old=rollout")
    load_train(example, "algorithm.name=grpo", "algorithm.grpo.old=rollout", "rollout.top_k=-1", "rollout.top_p=1")


def test_an_adopted_server_serving_another_model_name_is_refused_with_the_flags_it_needs(tmp_path):
    cfg = VLLMEngineConfig.model_validate({"kind": "vllm", "urls": ["http://h:1"]})
    member = Member(VLLMServer("http://h:1"), 0)
    member.server.call = lambda *_, **__: {"data": [{"id": "Qwen/Qwen3-8B"}]}
    with pytest.raises(FleetError, match=r"serves \['Qwen/Qwen3-8B'\], not 'opsd': start it with --served-model-name "
                                         r"opsd --logprobs-mode processed_logprobs --worker-extension-cls"):
        VLLMFleet(cfg, tmp_path, None).serving(member, 0)


@pytest.mark.parametrize(("transfer", "backend"), [("nccl", "nccl"), ("gloo", "opsd_gloo"), (None, None)])
def test_servers_open_the_weight_transfer_backend_the_config_names(tmp_path, transfer, backend):
    import json

    cfg = VLLMEngineConfig.model_validate({"kind": "vllm", "servers": {"weight_transfer": transfer}})
    command = VLLMFleet(cfg, tmp_path, None).server_command("/m", 8000, 0, None)
    if backend is None:
        assert "--weight-transfer-config" not in command
    else:
        assert json.loads(command[command.index("--weight-transfer-config") + 1]) == {"backend": backend}
