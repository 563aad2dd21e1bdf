"""Single-process units of the trainer: rollout protocol + recorded engine, the per-sample contract,
teacher weight sets, OPSD diagnostics, checkpoint integrity checks, config sections."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from megatron_opsd.algorithms.opsd import divergence_diagnostics
from megatron_opsd.data.sample import Sample, common_layout
from megatron_opsd.fileio import MANIFEST, CheckpointError, verify_manifest
from megatron_opsd.opsd.loss import LossConfig, dense_token_divergence
from megatron_opsd.opsd.teacher import Teacher, TeacherConfig
from megatron_opsd.rollout.engine import Rollout, RolloutEngine, SamplingConfig, SamplingParams, rollout_samples
from megatron_opsd.rollout.recorded import RecordedRolloutEngine
from megatron_opsd.train.checkpoint import LATEST, resolve
from megatron_opsd.train.optim import OptimConfig


# ------------------------------------------------------------------ OPSD diagnostics
def test_opsd_diagnostics_count_agreement_and_clipped_tokens_on_evenly_spaced_rows():
    torch.manual_seed(0)
    n, hidden, rows, vocab = 37, 16, 50, 45
    student_h = 0.5 * torch.randn(n, hidden)  # a teacher near the student: some rows agree, some clip
    teacher_h, teacher_w = student_h + 0.1 * torch.randn(n, hidden), torch.randn(rows, hidden)
    student_w = teacher_w + 0.1 * torch.randn(rows, hidden)
    student_w[vocab:] *= 100  # padding rows would win every argmax if they were not cut off
    cfg = LossConfig(vocab_size=vocab, clip=0.05)
    sums = divergence_diagnostics(student_h, teacher_h, student_w, teacher_w, cfg, None, max_tokens=20)
    picked = torch.linspace(0, n - 1, 20).long()  # 3 blocks of at most 8
    zs, zt = ((h[picked].double() @ w.double().T)[:, :vocab] for h, w in ((student_h, student_w), (teacher_h, teacher_w)))
    agree = int((zs.argmax(-1) == zt.argmax(-1)).sum())
    clipped = int((dense_token_divergence(zs, zt, cfg) < dense_token_divergence(zs, zt, cfg.model_copy(update={"clip": None}))).sum())
    assert 0 < agree < 20 and 0 < clipped < 20, (agree, clipped)  # neither count is trivially 0 or all
    assert {k: float(v) for k, v in sums.items()} == {"diag_agree": agree, "diag_clipped": clipped, "diag_tokens": 20.0}


# ------------------------------------------------------------------ rollout engine
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


def test_sampling_has_one_schema_with_one_top_k_convention():
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingConfig(top_k=5).top_k == 5
    for bad in ({"top_k": 0}, {"top_k": -2}, {"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
        with pytest.raises(ValidationError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="n must be at least 1"):
        SamplingParams(n=0)


# ------------------------------------------------------------------ samples
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


# ------------------------------------------------------------------ teacher
def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(4, 3).to(dtype).parameters())


@pytest.mark.parametrize("offload", [False, True])
def test_fixed_teacher_swaps_in_and_restores_exactly(offload):
    params = _params()
    teacher = Teacher(TeacherConfig(mode="fixed", offload=offload), params)
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    student = [p.detach().clone() for p in params]
    with teacher.weights_in_model():
        assert all(torch.equal(p, i) for p, i in zip(params, initial))
    assert all(torch.equal(p, s) for p, s in zip(params, student))
    assert torch.equal(teacher.weight_of(params[0]), initial[0])


def test_ema_teacher_keeps_fp32_accumulator_for_bf16_params():
    params = _params(torch.bfloat16)
    teacher = Teacher(TeacherConfig(mode="ema", ema_decay=0.999), params)
    assert teacher.master is not None and teacher.master[0].dtype == torch.float32
    expected = [p.detach().double() for p in params]
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(0.5)
        teacher.update()
        expected = [0.999 * e + 0.001 * p.detach().double() for e, p in zip(expected, params)]
    for m, w, e in zip(teacher.master, teacher.weights, expected):
        torch.testing.assert_close(m.double(), e, rtol=0, atol=1e-6)
        assert torch.equal(w, m.to(torch.bfloat16))
    # A bf16 accumulator would not have moved at all: 0.001 * 0.5 is below bf16 resolution near 1.
    assert not torch.equal(teacher.weights[0], _params(torch.bfloat16)[0].detach())


def test_live_teacher_holds_no_copy():
    params = _params()
    teacher = Teacher(TeacherConfig(mode="live"), params)
    assert teacher.state_tensors() is None
    assert teacher.weight_of(params[0]) is not params[0] and torch.equal(teacher.weight_of(params[0]), params[0])
    assert not teacher.weight_of(params[0]).requires_grad


# ------------------------------------------------------------------ checkpoint integrity
def _complete(root, name="step_000003"):
    ckpt = root / name
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 10)
    (ckpt / MANIFEST).write_text(json.dumps({"__0_0.distcp": 10}))
    (root / LATEST).write_text(name)
    return ckpt


def test_resolve_follows_latest_and_verify_accepts_complete(tmp_path):
    ckpt = _complete(tmp_path)
    assert resolve(tmp_path) == ckpt
    verify_manifest(ckpt)
    assert resolve(tmp_path / "empty") is None


def test_damaged_or_partial_checkpoints_are_clear_errors(tmp_path):
    ckpt = _complete(tmp_path)
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 4)
    with pytest.raises(CheckpointError, match="damaged: __0_0.distcp has 4 bytes, expected 10"):
        verify_manifest(ckpt)
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="damaged: __0_0.distcp is missing"):
        verify_manifest(ckpt)
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        verify_manifest(ckpt)
    (tmp_path / LATEST).write_text("step_000009")
    with pytest.raises(CheckpointError, match="names step_000009, which does not exist"):
        resolve(tmp_path)
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        resolve(tmp_path)


# ------------------------------------------------------------------ config sections
def test_sections_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        OptimConfig(learning_rate=1.0)
    with pytest.raises(ValidationError):
        TeacherConfig(mode="ema", ema_decay=1.0)
    assert OptimConfig().clip_grad == 0.1 and TeacherConfig().mode == "fixed"
