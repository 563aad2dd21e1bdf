"""The launcher's settings: environment variables ``OPSD_<NAME>``, set by the ``slurm/*.sh``
scripts (each a default a user overrides with ``VAR=... sbatch ...``) and checked here."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError

from megatron_opsd.launch.slurm import LaunchError
from megatron_opsd.section import Section

PREFIX = "OPSD_"
RENAMED = {"OPSD_SGLANG_TP": "OPSD_SERVER_TP"}  # settings under an old name: an error naming the new one


class LaunchConfig(Section):
    train_nodes: int = Field(default=1, ge=1, description="the first N nodes of the job run the trainer")
    gpus_per_node: int | None = Field(
        default=None, ge=0, description="GPUs of each node; default $SLURM_GPUS_PER_NODE, else 0 (CPU)")
    procs_per_node: int | None = Field(
        default=None, ge=1, description="trainer ranks per trainer node; default: one per GPU (1 on CPU)")
    tp: int | None = Field(default=None, ge=1, description="the trainer's tensor-parallel size (parallel.tp); "
                           "default: the training config's")
    pp: int | None = Field(default=None, ge=1, description="its pipeline-parallel size (parallel.pp)")
    server_tp: int | None = Field(default=None, ge=1, description="TP size of each rollout server, SGLang's or "
                                  "vLLM's (rollout.engine.servers.tp); default: the training config's")
    servers_per_node: int | None = Field(
        default=None, ge=1, description="rollout servers per rollout node; default: GPUs / server TP (1 on CPU)")
    fabric_prefix: str | None = Field(
        default=None, description="address prefix of the fabric every process binds and NCCL/gloo use (e.g. 10.); "
        "default: the address each node's host name resolves to")
    port_base: int | None = Field(default=None, description="the job's first port; default: from the job id")
    startup_s: float = Field(default=900.0, gt=0, description="for every server and the router to answer /health")
    on_stop: Literal["requeue", "resubmit", "exit"] = Field(
        default="requeue", description="when the trainer stops on a signal before its last step: requeue this job "
        "(scontrol requeue), resubmit its script (sbatch --dependency=singleton), or exit")
    run_dir: str | None = Field(default=None, description="the training run's directory; default runs/<job name> "
                                "(the same across requeues and resubmissions, so that they resume it)")
    log_root: str = Field(default="logs", description="per-job logs go to <log_root>/<job name>-<job id>[-r<restart>]")
    dry_run: bool = Field(default=False, description="print the plan (roles, srun lines, ports, config); start nothing")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LaunchConfig:
        renamed = [f"{old} is now {new} (SGLang's and vLLM's servers)" for old, new in RENAMED.items() if env.get(old)]
        if renamed:
            raise LaunchError("; ".join(renamed))
        values = {name: env[PREFIX + name.upper()] for name in cls.model_fields if env.get(PREFIX + name.upper())}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{PREFIX}{str(e['loc'][0]).upper()}={e.get('input')!r}: {e['msg']}"
                                 for e in exc.errors())
            raise LaunchError(problems) from None


def settings_reference() -> str:
    """The settings as ``OPSD_NAME  description`` lines (``opsd launch --help``)."""
    return "\n".join(f"  {PREFIX}{name.upper():<20} {field.description}"
                     + (f" [{field.default}]" if field.default not in (None, False) else "")
                     for name, field in LaunchConfig.model_fields.items())
