"""Kill-and-resume on two ranks (DP=2, distributed optimizer, EMA teacher, warmup + cosine LR).

``first_three_then_killed`` trains with a checkpoint after each step (keep 2); while drawing step
4's rollouts, it leaves the debris of an interrupted save and SIGKILLs itself with its checkpoint
writer's helpers (torchrun then ends the other rank). ``resume`` reruns the same config, which
restores the latest complete checkpoint and trains steps 4-6. The pytest module compares the
metrics file's per-step losses with the uninterrupted run of ``tests.workers.trainer``.
"""
from __future__ import annotations

import multiprocessing
import os
import signal

from megatron_opsd.train.loop import train
from tests.support.distributed import run_checks
from tests.support.engines import failing_engine
from tests.workers.trainer_common import RESUME, config, losses, save_json, work_path

RUN = work_path("resumed")
ROOT = RUN / "ckpt"


def _config():
    return config(*RESUME, f"run_dir={RUN}", "checkpoint.enabled=true", f"checkpoint.dir={ROOT}", "checkpoint.interval=1",
                  "checkpoint.keep_last=2")


def die_with_debris():
    """When asked for step 4's rollouts the whole node dies, the checkpoint writer's helper
    processes too (as under SLURM, where the job's cgroup is killed), amid a checkpoint's save."""
    assert sorted(p.name for p in ROOT.glob("step_*")) == ["step_000002", "step_000003"]
    (ROOT / ".step_000004.partial").mkdir()
    (ROOT / ".step_000004.partial" / "half_written.distcp").write_bytes(b"\0" * 100)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def check_first_three_then_killed():
    train(_config(), failing_engine(4, die_with_debris))


def check_resume():
    train(_config())
    save_json("losses_resumed.json", losses(RUN))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
