"""Evaluation: the pass@k estimator, majority vote (ties included), and the report from an engine."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, Qwen3Config

from megatron_opsd.data.prompts import PromptBuilder, PromptConfig
from megatron_opsd.data.sources import Problem
from megatron_opsd.eval.evaluate import EvalConfig, evaluate, majority_score, pass_at_k, reference_of, vote
from megatron_opsd.rollout.embedded import EmbeddedEngine
from megatron_opsd.rollout.engine import Rollout, SamplingParams
from megatron_opsd.rollout.recorded import RecordedRolloutEngine

REPO = Path(__file__).resolve().parents[1]


@st.composite
def n_c_k(draw):
    n = draw(st.integers(1, 9))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(deadline=None)
@given(n_c_k())
def test_pass_at_k_equals_enumeration_over_subsets(args):
    n, c, k = args
    subsets = list(itertools.combinations(range(n), k))
    brute = Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))  # samples 0..c-1 are correct
    assert pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, rel=1e-12)
    exact = 1 - Fraction(math.comb(1990, 500), math.comb(2000, 500))
    assert pass_at_k(2000, 10, 500) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(5000, 0, 4000) == 0.0 and pass_at_k(5000, 1001, 4000) == 1.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 2, 0), (4, 2, 5), (3, -1, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_vote_groups_equivalent_answers_and_ignores_missing():
    assert vote(["0.5", None, r"\frac{1}{2}", "3", "1/2", None]) == [("0.5", 3), ("3", 1)]
    assert vote([None, None]) == []


def test_majority_score():
    assert majority_score(["0.5", r"\frac12", "3"], "1/2") == 1.0
    assert majority_score(["3", "3", r"\frac12"], "1/2") == 0.0
    assert majority_score([None, None, "2"], "2") == 1.0, "samples without an answer cast no vote"
    assert majority_score([None, None], "2") == 0.0


def test_majority_ties_split_the_credit_whatever_the_order():
    """m groups tied for first, c of them correct: c/m (the expected score of a random tie-break)."""
    answers = ["1", "2", "2", "1", "3"]
    for order in itertools.permutations(answers):
        assert majority_score(list(order), "1") == 0.5
        assert majority_score(list(order), "3") == 0.0
    assert majority_score(["1", "2", "3"], "2") == pytest.approx(1 / 3)


def test_default_pass_at_values_and_validation():
    assert EvalConfig().pass_at_values() == [1, 2, 4, 8, 12]
    assert EvalConfig(k=1).pass_at_values() == [1]
    assert EvalConfig(k=8, pass_at=[4, 1, 4]).pass_at_values() == [1, 4]
    with pytest.raises(ValueError, match="pass_at values"):
        EvalConfig(k=4, pass_at=[8])


def test_reference_falls_back_to_the_solution_box():
    assert reference_of(Problem(0, "p", r"so \boxed{7}.", None)) == "7"
    assert reference_of(Problem(0, "p", r"\boxed{7}", "8")) == "8"
    with pytest.raises(ValueError, match="row 3: no answer field and no"):
        reference_of(Problem(3, "p", "no box here", None))


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer"), PromptConfig())


class Spy(RecordedRolloutEngine):
    """Recorded rollouts that also remember the sampling params of each call."""

    def __init__(self, records):
        super().__init__(records)
        self.calls: list[SamplingParams] = []

    def generate(self, prompts, params):
        self.calls.append(params)
        return super().generate(prompts, params)


def test_evaluate_report(builder, tmp_path):
    tok = builder.tokenizer
    problems = [Problem(0, "1 + 1?", "s", "2"), Problem(5, "Half of 1?", "s", r"\frac{1}{2}"),
                Problem(9, "3 * 3?", "s", "9")]
    responses = [  # k = 4 per problem: correct counts 2, 3, 0; one without a box, one truncated
        [r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "no idea"],
        [r"\boxed{0.5}", r"\boxed{1/2}", r"\boxed{\frac{1}{2}}", r"\boxed{2}"],
        [r"\boxed{6}", r"\boxed{6}", r"\boxed{9.5}", r"\boxed{9"],
    ]
    records = {}
    for problem, texts in zip(problems, responses):
        rollouts = []
        for j, text in enumerate(texts):
            ids = tok.encode(text, add_special_tokens=False)
            truncated = text.endswith("9")
            ids = ids if truncated else ids + [tok.eos_token_id]
            rollouts.append(Rollout(tuple(ids), (-0.1,) * len(ids), "length" if truncated else "stop"))
        records[tuple(builder.eval_ids(problem))] = rollouts
    engine = Spy(records)
    cfg = EvalConfig(k=4, batch_size=2, max_new_tokens=64)
    report = evaluate(engine, problems, builder, cfg, out=tmp_path / "eval" / "report.json")

    m = report["metrics"]
    assert m["avg@4"] == pytest.approx((2 + 3 + 0) / 12)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 3, 2) + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert report["no_answer_rate"] == pytest.approx(2 / 12) and report["truncated_rate"] == pytest.approx(1 / 12)
    assert [r["index"] for r in report["problems"]] == [0, 5, 9]
    assert report["problems"][1]["answers"] == ["0.5", "1/2", r"\frac{1}{2}", "2"]
    assert report["problems"][0]["responses"][0] == r"\boxed{2}"
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == report

    assert len(engine.calls) == 2  # batch_size 2 over 3 problems
    first = engine.calls[0]
    assert (first.temperature, first.top_p, first.top_k, first.n) == (1.0, 0.95, -1, 4)
    assert first.stop_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert first.seed != engine.calls[1].seed


def test_evaluate_rejects_an_engine_that_returns_too_few_rollouts(builder):
    class OnePerPrompt(RecordedRolloutEngine):
        def generate(self, prompts, params):
            return [[Rollout((5,), (-1.0,), "stop")] for _ in prompts]

    with pytest.raises(RuntimeError, match=r"engine returned \[1\] rollouts for 1 prompts, expected 2 each"):
        evaluate(OnePerPrompt({}), [Problem(0, "1 + 1?", "s", "2")], builder, EvalConfig(k=2))


def test_evaluate_with_the_embedded_engine(builder):
    config = Qwen3Config(vocab_size=len(builder.tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    engine = EmbeddedEngine.from_hf_config(config)
    problems = [Problem(i, f"What is {i} + {i}?", "s", str(2 * i)) for i in range(3)]
    cfg = EvalConfig(k=2, max_new_tokens=6, seed=3)
    report = evaluate(engine, problems, builder, cfg)
    again = evaluate(engine, problems, builder, cfg)
    assert report == again, "a seeded evaluation is reproducible"
    assert report["num_problems"] == 3 and report["weight_version"] == 0
    assert all(len(r["correct"]) == 2 and max(r["response_tokens"]) <= 6 for r in report["problems"])


def test_unparseable_gold_answers_are_warned_about_once_per_problem_set(caplog):
    from megatron_opsd.eval.evaluate import unparseable_references

    problems = [Problem(0, "p", "s", "\\frac{"), Problem(1, "q", "s", "3"), Problem(7, "r", None, "@@")]
    with caplog.at_level("WARNING", logger="megatron_opsd.eval.evaluate"):
        assert unparseable_references(problems) == unparseable_references(list(problems)) == [0, 7]
    assert [r.getMessage() for r in caplog.records].count(
        "2 gold answer(s) math-verify cannot parse, graded by string comparison only: rows [0, 7]") == 1
