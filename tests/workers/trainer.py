"""Trainer checks on two ranks: gradients at TP=2, PP=2, DP=2 against the single-process reference,
overfitting at TP=2 and PP=2, the uninterrupted run for the resume test, TP=2 -> TP=1 resume."""
from __future__ import annotations

import torch

from megatron_opsd.train.components import build_components
from megatron_opsd.train.loop import Trainer, train
from tests.support.distributed import run_checks
from tests.workers.trainer_common import RESUME, assert_close, config, full_grads, losses, save_json, work_path


def _grads_match(*layout: str) -> None:
    c = build_components(config("prompts_per_step=7", *layout))
    batches, _ = Trainer(c).step_batches(1)
    c.runner.accumulate_gradients(batches)
    reference = torch.load(work_path("reference_grads.pt"))
    assert_close(full_grads(c), reference, 1e-5, f"{layout} gradients vs single process")


def check_grads_tp2():
    _grads_match("parallel.tp=2")


def check_grads_pp2():
    _grads_match("parallel.pp=2")


def check_grads_dp2():
    # Plain DDP all-reduce: every rank then holds the full gradient to compare (the distributed
    # optimizer reduce-scatters, leaving each rank only its shard; it is exercised by the resume run).
    _grads_match("optim.distributed_optimizer=false")


def _overfit(*layout: str) -> None:
    c = build_components(config(*layout))
    batches, _ = Trainer(c).step_batches(1)
    losses = [c.runner(batches).metrics["loss"] for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0], losses


def check_overfit_tp2():
    _overfit("parallel.tp=2")


def check_overfit_pp2():
    _overfit("parallel.pp=2")


def check_uninterrupted_run():
    run_dir = work_path("uninterrupted")
    train(config(*RESUME, f"run_dir={run_dir}"))
    save_json("losses_uninterrupted.json", losses(run_dir))


def check_tp2_checkpoint_resumes_at_tp1():
    tp2 = work_path("tp2")
    train(config(*RESUME, "parallel.tp=2", "steps=4", f"run_dir={tp2}", "checkpoint.enabled=true",
                 f"checkpoint.dir={tp2 / 'ckpt'}", "checkpoint.interval=2"))
    tp1 = work_path("tp1_from_tp2")  # DP=2 now, distributed optimizer
    train(config(*RESUME, "steps=4", f"run_dir={tp1}", f"checkpoint.load={tp2 / 'ckpt' / 'step_000002'}"))
    torch.testing.assert_close(torch.tensor(losses(tp1)), torch.tensor(losses(tp2)[2:]), rtol=1e-5, atol=1e-7)


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
