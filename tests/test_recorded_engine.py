"""Recorded rollouts as a rollout engine: limits, errors naming the problem, versions, health and the file
round trip."""
from __future__ import annotations

import pytest

from megatron_opsd.rollout.engine import Rollout, RolloutEngine, SamplingParams
from megatron_opsd.rollout.recorded import RecordedRolloutEngine


def _engine() -> RecordedRolloutEngine:
    return RecordedRolloutEngine({
        (1, 2, 3): [Rollout((5, 6, 7, 8, 9), (-0.1, -0.2, -0.3, -0.4, -0.5), "stop"),
                    Rollout((4, 4), (-1.0, -1.0), "stop")],
    })


def test_recorded_engine_is_a_rollout_engine_and_applies_limits():
    engine = _engine()
    assert isinstance(engine, RolloutEngine)
    (out,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert out == [Rollout((5, 6, 7), (-0.1, -0.2, -0.3), "length", 0)]
    (out,) = engine.generate([[1, 2, 3]], SamplingParams(stop_token_ids=(7,), n=2))
    assert out == [Rollout((5, 6, 7), (-0.1, -0.2, -0.3), "stop", 0), Rollout((4, 4), (-1.0, -1.0), "stop", 0)]


def test_recorded_engine_errors_name_the_problem():
    with pytest.raises(KeyError, match="no recorded rollout for prompt 1"):
        _engine().generate([[1, 2, 3], [9, 9]], SamplingParams())
    with pytest.raises(ValueError, match="2 recorded rollouts, 3 requested"):
        _engine().generate([[1, 2, 3]], SamplingParams(n=3))
    with pytest.raises(ValueError, match="log-probs"):
        Rollout((1, 2), (-1.0,), "stop")


def test_recorded_engine_versions_health_and_file_round_trip(tmp_path):
    engine = _engine()
    engine.weight_version = 3
    assert engine.health().ok and engine.generate([[1, 2, 3]], SamplingParams())[0][0].weight_version == 3
    with pytest.raises(NotImplementedError, match="no model to score"):
        engine.logprobs([[1, 2, 3]])
    engine.save(tmp_path / "r.jsonl")
    assert RecordedRolloutEngine.load(tmp_path / "r.jsonl").records == engine.records
    (tmp_path / "bad.jsonl").write_text('{"prompt": [1]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        RecordedRolloutEngine.load(tmp_path / "bad.jsonl")
