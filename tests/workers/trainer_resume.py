"""Kill-and-resume on two ranks (DP=2, distributed optimizer, EMA teacher, warmup + cosine LR).

``first_three_then_killed`` trains 3 steps with a checkpoint after each (keep 2), leaves the debris
of an interrupted 4th save, and SIGKILLs both ranks in the middle of step 4. ``resume`` restores
the latest complete checkpoint and trains steps 4-6. The pytest module compares the per-step losses
with the uninterrupted run of ``tests.workers.trainer``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal

import torch.distributed as dist

from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.opsd.step import rank_micro_batches
from tests.distributed import run_checks
from tests.workers.trainer_common import RESUME, args, load, make_trainer, pairs_for, resume_data, run, save, work_path

A = args()
ROOT = work_path("ckpt_resume")


def check_first_three_then_killed():
    trainer = make_trainer(A.hf_dir, **RESUME)
    it, engine = resume_data()
    losses = []
    for step in range(1, 4):
        losses += run(trainer, it, engine, 1)
        save(trainer, ROOT, step, it, keep_last=2)
    assert sorted(p.name for p in ROOT.glob("step_*")) == ["step_000002", "step_000003"]
    if dist.get_rank() == 0:
        work_path("losses_first.json").write_text(json.dumps(losses))
        (ROOT / ".tmp.step_000004").mkdir()
        (ROOT / ".tmp.step_000004" / "half_written.distcp").write_bytes(b"\0" * 100)
    dist.barrier()
    batches = rank_micro_batches(pairs_for(it.take(6), engine), PackingConfig(tokens_per_micro_batch=48))
    trainer.step.teacher_pass(batches)
    # The whole node dies: also the checkpoint writer's helper processes, which would otherwise
    # outlive this rank (as under SLURM, where the job's cgroup is killed).
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def check_resume():
    trainer = make_trainer(A.hf_dir, **RESUME)
    it, engine = resume_data()
    assert load(trainer, ROOT, it) == 3
    losses = run(trainer, it, engine, 3)
    if dist.get_rank() == 0:
        work_path("losses_resumed.json").write_text(json.dumps(losses))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
