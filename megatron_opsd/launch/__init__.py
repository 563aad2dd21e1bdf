"""``opsd launch``: one SLURM job runs trainer and rollout nodes (``slurm/*.sh`` call it).

``opsd launch slurm CONFIG [key=value ...]`` runs in the batch script: it plans the job from SLURM's
variables and the ``OPSD_*`` settings (``launch/plan.py``), prints the plan, and with
``OPSD_DRY_RUN=1`` (or ``--dry-run``) stops there; otherwise it starts the roles' job steps, waits
for the fleet, runs the trainer and requeues the job when the trainer stopped on a signal
(``launch/run.py``). ``opsd launch task ROLE PLAN`` is what each job step's tasks run
(``launch/task.py``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_opsd.launch.config import LaunchConfig, settings_reference
from megatron_opsd.launch.plan import ROLES
from megatron_opsd.launch.slurm import Job, LaunchError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("launch", help="run trainer and rollout nodes in a SLURM job (slurm/*.sh)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = p.add_subparsers(dest="launch_command", required=True, metavar="WHAT")
    job = roles.add_parser("slurm", help="plan this SLURM job and run it (the batch script's command)",
                           epilog="settings (environment):\n" + settings_reference(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    job.add_argument("config", type=Path, help="the training config (YAML)")
    job.add_argument("overrides", nargs="*", help="dotted key=value overrides of the training config")
    job.add_argument("--dry-run", action="store_true", help="print the plan and start nothing (also OPSD_DRY_RUN=1)")
    job.set_defaults(func=run_job)
    task = roles.add_parser("task", help="one job step's task (srun runs it; not for a shell)")
    task.add_argument("role", choices=ROLES)
    task.add_argument("plan", type=Path)
    task.set_defaults(func=run_task)


def run_job(args: argparse.Namespace) -> int:
    from megatron_opsd.launch.plan import make_plan
    from megatron_opsd.launch.run import launch
    from megatron_opsd.train.cli import quiet_megatron

    quiet_megatron()

    settings = LaunchConfig.from_env()
    plan = make_plan(Job.from_env(), settings, args.config, args.overrides)
    print(plan.describe(), flush=True)
    if args.dry_run or settings.dry_run:
        return 0
    return launch(plan)


def run_task(args: argparse.Namespace) -> int:
    from megatron_opsd.launch.task import run_task as exec_task

    exec_task(args.role, args.plan, os.environ)
    return 1  # not reached: the task became its role's process


__all__ = ["LaunchError", "register"]
