"""Trainer checks on two ranks: gradients at TP=2, PP=2, DP=2 against the single-process reference,
overfitting at TP=2 and PP=2, the uninterrupted run for the resume test, TP=2 -> TP=1 resume."""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.opsd.step import rank_micro_batches
from tests.distributed import run_checks
from tests.workers.trainer_common import (
    RESUME,
    args,
    assert_close,
    fixed_pairs,
    full_grads,
    load,
    make_trainer,
    resume_data,
    run,
    save,
    work_path,
)

A = args()


def _grads_match(tp: int, pp: int, distributed_optimizer: bool | None = None) -> None:
    trainer = make_trainer(A.hf_dir, tp=tp, pp=pp, distributed_optimizer=distributed_optimizer)
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=40))
    trainer.step.student_pass(batches, trainer.step.teacher_pass(batches))
    reference = torch.load(work_path("reference_grads.pt"))
    assert_close(full_grads(trainer), reference, 1e-5, f"TP={tp} PP={pp} gradients vs single process")


def check_grads_tp2():
    _grads_match(tp=2, pp=1)


def check_grads_pp2():
    _grads_match(tp=1, pp=2)


def check_grads_dp2():
    # Plain DDP all-reduce: every rank then holds the full gradient to compare (the distributed
    # optimizer reduce-scatters, leaving each rank only its shard; it is exercised by the resume run).
    _grads_match(tp=1, pp=1, distributed_optimizer=False)


def _overfit(tp: int, pp: int) -> None:
    trainer = make_trainer(A.hf_dir, tp=tp, pp=pp)
    batches = rank_micro_batches(fixed_pairs(), PackingConfig(tokens_per_micro_batch=64))
    losses = [trainer.step(batches).metrics["loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def check_overfit_tp2():
    _overfit(tp=2, pp=1)


def check_overfit_pp2():
    _overfit(tp=1, pp=2)


def check_uninterrupted_run():
    trainer = make_trainer(A.hf_dir, **RESUME)
    it, engine = resume_data()
    losses = run(trainer, it, engine, 6)
    if dist.get_rank() == 0:
        work_path("losses_uninterrupted.json").write_text(json.dumps(losses))


def check_tp2_checkpoint_resumes_at_tp1():
    root = work_path("ckpt_tp2")
    trainer = make_trainer(A.hf_dir, tp=2, **RESUME)
    it, engine = resume_data()
    run(trainer, it, engine, 2)
    save(trainer, root, 2, it)
    expected = run(trainer, it, engine, 2)
    trainer = make_trainer(A.hf_dir, tp=1, **RESUME)  # DP=2 now, distributed optimizer
    it, engine = resume_data()
    assert load(trainer, root, it) == 2
    got = run(trainer, it, engine, 2)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-7)


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
