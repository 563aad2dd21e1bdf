"""The embedded rollout engine: decoding rules, sampling parameters, reproducibility, weight sync."""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig, WeightSyncError, sample, truncate
from megatron_opsd.rollout.engine import RolloutEngine, SamplingParams
from tests.support.distributed import assert_check, launch

# The shipped tokenizer's vocabulary (752) with a Qwen3 architecture small enough for 2 CPU cores.
CONFIG = Qwen3Config(vocab_size=752, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)
PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [300, 301, 302, 303, 304, 305, 306, 307, 11]]


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Weights large enough that next-token distributions are peaked and differ between positions
    (the default 0.02 init gives almost uniform ones, where decoding bugs hide)."""
    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG)
    return {name: 1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
            else 0.3 * torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_weights(0)


@pytest.fixture(scope="module")
def engine(weights) -> EmbeddedEngine:
    engine = EmbeddedEngine.from_hf_config(CONFIG)
    engine.update_weights(weights.items(), version=1)
    return engine


def greedy_reference(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Plain decoding: a full forward over the whole sequence each step, argmax of the last logits."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            logprobs.append(float(torch.log_softmax(logits, -1)[ids[-1]]))
    return ids[len(prompt):], logprobs


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.health().ok and engine.weight_version == 1


def test_greedy_equals_full_forward_argmax_in_a_left_padded_batch(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, (rollout,) in zip(PROMPTS, out):
        tokens, logprobs = greedy_reference(engine.model, prompt, 12)
        assert list(rollout.response_ids) == tokens
        assert rollout.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert rollout.finish_reason == "length"
    assert len({r[0].response_ids for r in out}) == len(PROMPTS), "prompts should not all decode alike"


def test_batched_equals_unbatched_greedy(engine):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    batched = engine.generate(PROMPTS, params)
    for prompt, (rollout,) in zip(PROMPTS, batched):
        (alone,) = engine.generate([prompt], params)[0]
        assert alone.response_ids == rollout.response_ids
        assert alone.logprobs == pytest.approx(rollout.logprobs, abs=1e-5)


def test_top_k_1_is_deterministic_and_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    runs = [engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=8, n=2))
            for _ in range(2)]
    for g, a, b in zip(greedy, *runs):
        assert {r.response_ids for r in a + b} == {g[0].response_ids}


def test_seed_reproducible_and_independent_of_batching(engine, weights):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=16, n=3, seed=7)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert first == again
    small = EmbeddedEngine.from_hf_config(CONFIG, EmbeddedEngineConfig(max_batch_size=2))
    small.update_weights(weights.items(), version=1)
    assert [[r.response_ids for r in rs] for rs in small.generate(PROMPTS, params)] == \
        [[r.response_ids for r in rs] for rs in first]
    other = engine.generate(PROMPTS, dataclasses.replace(params, seed=8))
    assert [[r.response_ids for r in rs] for rs in other] != [[r.response_ids for r in rs] for rs in first]


def test_n_samples_per_prompt_differ(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=10, n=4, seed=1))
    assert [len(rs) for rs in out] == [4] * len(PROMPTS)
    for rs in out:
        assert len({r.response_ids for r in rs}) > 1


def test_stop_ids_and_max_new_tokens(engine):
    (greedy,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=12))[0]
    stop = greedy.response_ids[4]
    first = greedy.response_ids.index(stop)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop,))
    (stopped,) = engine.generate([PROMPTS[0]], params)[0]
    assert stopped.response_ids == greedy.response_ids[:first + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == greedy.logprobs[:first + 1]

    stops = (11, 42, 99, 123, 200, 301)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=20, stop_token_ids=stops, n=8, seed=3)
    reasons = collections.Counter()
    for rollout in (r for rs in engine.generate(PROMPTS, params) for r in rs):
        ids, reason = rollout.response_ids, rollout.finish_reason
        reasons[reason] += 1
        assert not set(ids[:-1]) & set(stops), "generation must end at the first stop id"
        assert (reason == "stop") == (ids[-1] in stops)
        assert reason == "stop" or len(ids) == 20
        assert len(ids) <= 20
    assert reasons["stop"] and reasons["length"], f"want both finish reasons exercised, got {reasons}"


def test_reported_logprobs_are_temperature_scaled_before_truncation(engine):
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, max_new_tokens=12, n=2, seed=5)
    for prompt, rollouts in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for r in rollouts:
            (forced,) = engine.logprobs([prompt + list(r.response_ids)], temperature=0.7)
            assert list(r.logprobs) == pytest.approx(forced[len(prompt) - 1:].tolist(), abs=1e-4)
            assert all(lp < 0 for lp in r.logprobs)


def test_sampler_matches_the_truncated_distribution():
    """Empirical frequencies of ``sample`` match softmax(truncate(logits / T)): top-k and top-p honoured."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    rows = 6000
    for top_k, top_p, allowed in ((3, 1.0, 3), (-1, 0.75, 3), (4, 0.95, 4)):
        params = SamplingParams(temperature=0.9, top_p=top_p, top_k=top_k, max_new_tokens=1)
        target = torch.softmax(truncate(logits / 0.9, top_k, top_p), -1)[0]
        assert (target > 0).sum() == allowed
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        tokens, logprobs = sample(logits.expand(rows, -1), params, gens)
        freq = torch.bincount(tokens, minlength=6) / rows
        assert torch.all(freq[target == 0] == 0)
        assert torch.allclose(freq, target, atol=0.025), (top_k, top_p, freq, target)
        assert torch.allclose(logprobs, torch.log_softmax(logits / 0.9, -1)[0, tokens])


@pytest.mark.parametrize("top_k,top_p", [(20, 0.95), (20, 1.0), (3, 0.5), (1, 0.95)])
def test_a_rows_tokens_do_not_depend_on_the_batch_around_it(top_k, top_p):
    """Top-k rows draw k numbers, rows with ties at the k-th value the whole vocabulary: each row's
    stream (over several steps) is the same alone as in any batch."""
    torch.manual_seed(0)
    logits = torch.randn(16, 5000) * 4
    logits[5, :40] = 50.0  # ties at the k-th value: this row races the whole vocabulary
    params = SamplingParams(temperature=1.1, top_p=top_p, top_k=top_k, max_new_tokens=1)
    batched = [torch.Generator().manual_seed(s) for s in range(16)]
    alone = [torch.Generator().manual_seed(s) for s in range(16)]
    for _ in range(3):
        together, _ = sample(logits, params, batched)
        separately = torch.cat([sample(logits[r:r + 1], params, [alone[r]])[0] for r in range(16)])
        assert torch.equal(together, separately)
        assert together[5] < 40  # the tied row keeps to its tied top tokens
    tied = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])  # ties at the k-th value: truncate keeps them all
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=2, max_new_tokens=1)
    tokens, _ = sample(tied.expand(4000, -1), params, [torch.Generator().manual_seed(i) for i in range(4000)])
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_update_weights_logits_equal_reference_model(engine, weights):
    fresh = random_weights(1)
    try:
        engine.update_weights(iter(fresh.items()), version=2)
        reference = AutoModelForCausalLM.from_config(CONFIG)
        reference.load_state_dict(fresh, strict=False)  # lm_head is tied to the embedding
        ids = torch.tensor([PROMPTS[2]])
        with torch.no_grad():
            assert torch.equal(engine.model(ids).logits, reference(ids).logits)
        assert engine.weight_version == 2
    finally:
        engine.update_weights(weights.items(), version=1)


def test_adopted_weights_are_the_senders_tensors_and_follow_their_changes(weights):
    engine = EmbeddedEngine.from_hf_config(CONFIG)
    sent = {name: t.clone() for name, t in weights.items()}
    sent["model.norm.weight"] = sent["model.norm.weight"].double()  # another dtype: copied, cast
    engine.update_weights(sent.items(), version=3, adopt=True)
    params = dict(engine.model.named_parameters())
    assert all(params[name].data_ptr() == t.data_ptr() for name, t in sent.items() if name != "model.norm.weight")
    assert params["model.norm.weight"].dtype == torch.float32 and torch.equal(
        params["model.norm.weight"], sent["model.norm.weight"].float())
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        before = engine.model(ids).logits
        sent["model.embed_tokens.weight"].mul_(2)  # the sender changes it in place: so does the tied head
        after = engine.model(ids).logits
    reference = AutoModelForCausalLM.from_config(CONFIG)
    reference.load_state_dict({name: t.float() for name, t in sent.items()}, strict=False)
    with torch.no_grad():
        assert not torch.equal(before, after) and torch.equal(after, reference(ids).logits)
    assert engine.weight_version == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"}, "not received: model.norm.weight"),
    (lambda w: {**w, "model.layers.9.mlp.up_proj.weight": torch.zeros(3)},
     "model.layers.9.mlp.up_proj.weight: unknown name"),
    (lambda w: {**w, "lm_head.weight": w["model.embed_tokens.weight"]},
     "lm_head.weight: not a parameter of this model"),
    (lambda w: {**w, "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)},
     "model.layers.0.self_attn.q_proj.weight: shape [64, 32], the model expects [64, 64]"),
])
def test_bad_weight_stream_is_an_error_and_blocks_generation(weights, mutate, message):
    engine = EmbeddedEngine.from_hf_config(CONFIG)
    engine.update_weights(weights.items(), version=1)
    stream = list(mutate(dict(weights)).items())
    consumed = []
    with pytest.raises(WeightSyncError, match=message.replace("[", r"\[")):
        engine.update_weights((consumed.append(name) or (name, t) for name, t in stream), version=2)
    assert len(consumed) == len(stream), "the stream must be drained (the exporter is collective)"
    assert not engine.health().ok and engine.weight_version == 1
    with pytest.raises(WeightSyncError, match="failed"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    engine.update_weights(weights.items(), version=3)
    assert engine.health().ok and engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_a_stream_that_fails_midway_blocks_generation_and_names_are_checked_without_reading(weights):
    engine = EmbeddedEngine.from_hf_config(CONFIG)
    engine.update_weights(weights.items(), version=1)

    def breaks_after_one():
        yield next(iter(weights.items()))
        raise OSError("truncated file")

    with pytest.raises(OSError, match="truncated"):
        engine.update_weights(breaks_after_one(), version=2)
    assert not engine.health().ok and "midway" in engine.health().detail
    shapes = [(name, list(t.shape)) for name, t in weights.items()]
    assert engine.weight_errors(shapes) == []
    assert engine.weight_errors([*shapes[1:], ("model.norm.weight", [3])]) == [
        "model.norm.weight: sent twice", f"1 parameter(s) not received: {shapes[0][0]}"]


def test_duplicate_tensor_is_an_error(weights):
    engine = EmbeddedEngine.from_hf_config(CONFIG)
    with pytest.raises(WeightSyncError, match="model.norm.weight: sent twice"):
        engine.update_weights([*weights.items(), ("model.norm.weight", weights["model.norm.weight"])], version=1)


@pytest.mark.parametrize("prompts, params, message", [
    ([[1, 2], []], SamplingParams(max_new_tokens=4), "prompt 1 is empty"),
    ([[1, 752]], SamplingParams(max_new_tokens=4), r"token ids \[752\] outside the vocabulary"),
    ([[1] * 100], SamplingParams(max_new_tokens=40), "exceed the model's max_position_embeddings=128"),
])
def test_bad_requests_are_errors(engine, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, params)


def test_megatron_export_feeds_the_engine(tmp_path):
    """A TP=2 Megatron model streamed through ``model_hf_tensors`` gives the engine the same logits."""
    assert_check(launch("tests.workers.embedded_engine", 2, tmp_path), "megatron_export_logits")


def test_from_pretrained_loads_a_local_checkpoint(engine, tmp_path):
    engine.model.save_pretrained(tmp_path)
    loaded = EmbeddedEngine.from_pretrained(tmp_path)
    loaded.weight_version = engine.weight_version
    params = SamplingParams(temperature=0, max_new_tokens=6)
    assert loaded.generate(PROMPTS, params) == engine.generate(PROMPTS, params)
