"""Rollouts into samples (the per-sample contract) and the one sampling schema."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from megatron_opsd.data.sample import Sample, common_layout
from megatron_opsd.rollout.engine import Rollout, SamplingConfig, SamplingParams, rollout_samples


def test_sampling_has_one_schema_with_one_top_k_convention():
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingConfig(top_k=5).top_k == 5
    for bad in ({"top_k": 0}, {"top_k": -2}, {"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
        with pytest.raises(ValidationError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="n must be at least 1"):
        SamplingParams(n=0)


def test_rollouts_become_samples_with_their_log_probs_version_and_group():
    rollouts = [[Rollout((5, 6), (-0.5, -0.25), "stop", 4), Rollout((7,), (-1.0,), "length", 4)], [Rollout((8,), (-2.0,), "stop", 4)]]
    groups = rollout_samples([[1, 2], [3]], rollouts)
    assert [[(s.prompt_ids, s.response_ids, s.group_id) for s in g] for g in groups] == [
        [((1, 2), (5, 6), 0), ((1, 2), (7,), 0)], [((3,), (8,), 1)]]
    first = groups[0][0]
    assert first.rollout_logprobs == (-0.5, -0.25) and first.weight_version == 4 and first.teacher_ids is None
    assert first.per_token == {"rollout_logprobs": (-0.5, -0.25)} and first.student_ids == (1, 2, 5, 6)


def test_sample_contract_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-empty prompt and a non-empty response"):
        Sample((1,), ())
    with pytest.raises(ValueError, match="rollout_logprobs: 1 values for 2 response tokens"):
        Sample((1,), (2, 3), rollout_logprobs=(-1.0,))
    with pytest.raises(ValueError, match="advantage: 3 values for 2 response tokens"):
        Sample((1,), (2, 3), token_extras={"advantage": (1.0, 1.0, 1.0)})
    with pytest.raises(ValueError, match="reserved"):
        Sample((1,), (2,), token_extras={"rollout_logprobs": (0.0,)})
    two = Sample((1,), (2,), teacher_prompt_ids=(9, 9))
    assert two.teacher_ids == (9, 9, 2) and common_layout([two, two]).two_sided
    with pytest.raises(ValueError, match="sample 1 lacks a teacher side"):
        common_layout([two, Sample((1,), (2,))])
    with pytest.raises(ValueError, match=r"sample 1 carries per-token values \['a'\], sample 0 \[\]"):
        common_layout([Sample((1,), (2,)), Sample((1,), (2,), token_extras={"a": (0.0,)})])
