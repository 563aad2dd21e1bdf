"""Trainer checks in one process (TP=1, PP=1, DP=1); also writes the reference gradients that the
multi-rank worker compares against."""
from __future__ import annotations

import torch

from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.opsd.step import NonFiniteError, rank_micro_batches
from tests.distributed import run_checks
from tests.workers.trainer_common import (
    args,
    assert_close,
    fixed_pairs,
    full_grads,
    full_params,
    make_trainer,
    work_path,
)

A = args()


def grads_for(tokens_per_micro_batch: int) -> tuple[dict[str, torch.Tensor], int]:
    trainer = make_trainer(A.hf_dir)
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=tokens_per_micro_batch))
    trainer.step.student_pass(batches, trainer.step.teacher_pass(batches))
    return full_grads(trainer), len(batches)


def check_reference_grads_and_microbatch_independence():
    one, n_one = grads_for(512)
    many, n_many = grads_for(40)
    assert n_one == 1 and n_many >= 4, (n_one, n_many)
    assert_close(many, one, 1e-6, f"{n_many} micro-batches vs 1")
    torch.save(one, work_path("reference_grads.pt"))


def check_overfit_tp1():
    trainer = make_trainer(A.hf_dir)
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    losses = [trainer.step(batches).metrics["loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def check_teacher_fixed_no_grad_and_unchanged():
    trainer = make_trainer(A.hf_dir, teacher="fixed")
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    hidden = trainer.step.teacher_pass(batches)
    assert hidden and not any(h.requires_grad for h in hidden)
    for _ in range(3):
        assert trainer.step(batches).applied
    teacher = trainer.teacher
    assert all(not w.requires_grad and w.grad is None for w in teacher.weights)
    assert all(torch.equal(w, p0) for w, p0 in zip(teacher.weights, initial)), "fixed teacher changed"
    assert not all(torch.equal(p, p0) for p, p0 in zip(trainer.model.parameters(), initial)), "student did not train"
    # The teacher pass sees the initial weights and leaves the student's weights in place.
    student = [p.detach().clone() for p in trainer.model.parameters()]
    again = trainer.step.teacher_pass(batches)
    assert all(torch.equal(a, b) for a, b in zip(again, hidden)), "teacher pass does not use the initial weights"
    assert all(torch.equal(p, s) for p, s in zip(trainer.model.parameters(), student)), "student weights not restored"


def check_teacher_ema_matches_hand_computation():
    decay = 0.9
    trainer = make_trainer(A.hf_dir, teacher="ema", ema_decay=decay)
    expected = [p.detach().clone().double() for p in trainer.model.parameters()]
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    for _ in range(3):
        assert trainer.step(batches).applied
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, trainer.model.parameters())]
    for w, e in zip(trainer.teacher.weights, expected):
        torch.testing.assert_close(w.double(), e, rtol=0, atol=1e-6)
    assert not all(torch.equal(w, p) for w, p in zip(trainer.teacher.weights, trainer.model.parameters()))


def check_teacher_live_is_current_weights():
    trainer = make_trainer(A.hf_dir, teacher="live")
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    for _ in range(2):
        assert trainer.step(batches).applied
    hidden = trainer.step.teacher_pass(batches)
    assert not any(h.requires_grad for h in hidden)
    with torch.no_grad():
        for mb, h in zip(batches, hidden):
            side = mb.teacher
            out = trainer.model(side.tokens[None], side.position_ids[None], side.attention_mask(), output="hidden")
            assert torch.equal(out[0, side.predict_positions], h), "live teacher differs from the current weights"


def check_nan_skips_step_and_counts():
    trainer = make_trainer(A.hf_dir, max_consecutive_skips=2)
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    assert trainer.step(batches).applied
    before = full_params(trainer)
    hook = trainer.model.decoder.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    result = trainer.step(batches)
    hook.remove()
    assert not result.applied and result.metrics["skipped"] == 1 and result.metrics["skipped_total"] == 1, result.metrics
    assert_close(full_params(trainer), before, 0.0, "parameters after a skipped step")
    result = trainer.step(batches)
    assert result.applied and result.metrics["skipped_total"] == 1, result.metrics
    # Two consecutive non-finite steps stop the run with a clear message.
    hook = trainer.model.decoder.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    assert not trainer.step(batches).applied
    try:
        trainer.step(batches)
    except NonFiniteError as exc:
        assert "2 consecutive steps" in str(exc), exc
    else:
        raise AssertionError("no NonFiniteError after 2 consecutive non-finite steps")
    finally:
        hook.remove()


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
