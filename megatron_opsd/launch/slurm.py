"""What a SLURM job tells its batch script, and the scheduler calls the launcher makes.

The node list comes from ``scontrol show hostnames``; where SLURM is not installed (a dry run on
a laptop), the same expansion is done here, so that a plan can be checked against any
``SLURM_JOB_NODELIST``.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_opsd.errors import UserError


class LaunchError(UserError, RuntimeError):
    """A launch that cannot go on: bad settings, a node without the fabric, a step that died."""


@dataclass(frozen=True)
class Job:
    """The allocation this batch script runs in."""

    id: int
    name: str
    nodes: tuple[str, ...]
    restart_count: int = 0  # SLURM_RESTART_COUNT: how often the job was requeued
    cpus_per_node: int | None = None  # SLURM_CPUS_ON_NODE (the batch node's; nodes are alike)
    gpus_per_node: int | None = None  # SLURM_GPUS_PER_NODE

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Job:
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} unset: not inside a SLURM job (submit it with sbatch; for a "
                              f"dry run on any machine set them, e.g. SLURM_JOB_ID=1 SLURM_JOB_NODELIST=node[01-16])")
        return cls(id=_integer(env, "SLURM_JOB_ID"), name=env.get("SLURM_JOB_NAME", "opsd"),
                   nodes=tuple(hostnames(env["SLURM_JOB_NODELIST"])),
                   restart_count=_integer(env, "SLURM_RESTART_COUNT", 0),
                   cpus_per_node=_integer(env, "SLURM_CPUS_ON_NODE", None),
                   gpus_per_node=_gpus(env.get("SLURM_GPUS_PER_NODE")))


def _integer(env: Mapping[str, str], key: str, default: int | None = ...) -> int | None:
    value = env.get(key)
    if not value:
        if default is ...:
            raise LaunchError(f"{key} unset")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer") from None


def _gpus(value: str | None) -> int | None:
    """SLURM_GPUS_PER_NODE is ``8`` or ``h100:8``."""
    return int(value.rsplit(":", 1)[-1]) if value and value.rsplit(":", 1)[-1].isdigit() else None


def hostnames(nodelist: str) -> list[str]:
    """The host names of a SLURM node list: ``scontrol show hostnames`` where it runs, else the same
    expansion done here (:func:`expand_hostlist`)."""
    if shutil.which("scontrol"):
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    return expand_hostlist(nodelist)


_ITEM = re.compile(r"(?:[^,\[]|\[[^\]]*\])+")


def expand_hostlist(nodelist: str) -> list[str]:
    """``node[001-003,7],gpu-a[1-2]-x`` -> node001, node002, node003, node007, gpu-a1-x, gpu-a2-x:
    items split at commas outside brackets, each bracket a list of numbers and ranges (a range keeps
    its zero padding), several brackets in one item combined in order."""
    if nodelist.count("[") != nodelist.count("]"):
        raise LaunchError(f"node list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in _ITEM.findall(nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
        choices = [[parts[0]]]
        for ranges, text in zip(parts[1::2], parts[2::2]):
            choices += [_expand_ranges(ranges, nodelist), [text]]
        hosts += ["".join(p) for p in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise LaunchError(f"node list {nodelist!r}: {part!r} is not a number or a range")
        out += [f"{i:0{len(low)}d}" for i in range(int(low), int(high or low) + 1)]
    return out


def requeue(job_id: int) -> None:
    """Put this job back in the queue; SLURM ends the running batch script (so call it last)."""
    done = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LaunchError(f"scontrol requeue {job_id} failed (is the job submitted with --requeue?): "
                          f"{done.stderr.strip()}")


def resubmit(job: Job, script_args: list[str]) -> str:
    """Submit this job's script again with ``script_args``, to start when this one has ended
    (``--dependency=singleton``: one job of this name at a time), in the same directory and
    appending to the same output; its id."""
    shown = subprocess.run(["scontrol", "show", "job", str(job.id), "-o"], capture_output=True, text=True,
                           check=False).stdout
    fields = dict(re.findall(r"\b(Command|WorkDir|StdOut)=(\S+)", shown))
    if "Command" not in fields:
        raise LaunchError(f"cannot resubmit job {job.id}: scontrol does not show its script")
    command = ["sbatch", "--parsable", "--dependency=singleton", f"--job-name={job.name}", "--open-mode=append",
               *(f"--{flag}={fields[key]}" for flag, key in (("chdir", "WorkDir"), ("output", "StdOut"))
                 if key in fields),
               fields["Command"], *script_args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LaunchError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
