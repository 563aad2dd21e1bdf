"""What each job step runs (``opsd launch task ROLE PLAN``): the task finds its place from SLURM's
task variables and its node's fabric address, announces where it will listen (a file in the
job's ``registry/``, read by the launcher and by the other trainer nodes), then becomes the
server, the router or torchrun (``exec``: their signals and exit codes are SLURM's to see)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.launch.network import fabric_interface
from megatron_opsd.launch.plan import CONFIG_FILE, ROLES, Plan
from megatron_opsd.launch.slurm import LaunchError
from megatron_opsd.rollout.factory import API_KEY_ENV
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.fleet import router_command, server_command
from megatron_opsd.rollout.sync.distributed import NODE_ADDRESS_ENV

REGISTRY = "registry"


def announce(plan: Plan, name: str, payload: dict[str, Any]) -> None:
    atomic_write_text(Path(plan.log_dir) / REGISTRY / f"{name}.json", json.dumps(payload))


def announced(plan: Plan, name: str) -> dict[str, Any] | None:
    path = Path(plan.log_dir) / REGISTRY / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_task(role: str, plan_path: Path, env: Mapping[str, str] = os.environ) -> NoReturn:
    plan = Plan.load(plan_path)
    interface, address = fabric_interface(plan.fabric_prefix)
    argv, env = task_command(plan, role, interface, address, dict(env))
    os.execvpe(argv[0], argv, env)


def task_command(plan: Plan, role: str, interface: str, address: str,
                 env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(command line, environment) of this task of ``role``, announced in the registry."""
    rank = int(env.get("SLURM_PROCID", "0"))
    engine = SGLangEngineConfig.model_validate(plan.config["rollout"]["engine"]) if plan.uses_fleet else None
    api_key = env.get(API_KEY_ENV)
    if role == "server":
        slot = plan.servers[rank]
        extra = ["--nccl-port", str(slot.nccl_port)]
        if plan.gpus_per_node:
            extra += ["--base-gpu-id", str(slot.base_gpu_id)]
        argv = server_command(engine, plan.model_path, address, slot.port, 0, plan.load_format, api_key, extra)
        announce(plan, f"server-{slot.index}", {"url": f"http://{address}:{slot.port}", "node": slot.node})
        return argv, env
    if role == "router":
        ports = plan.ports
        announce(plan, "router", {"url": f"http://{address}:{ports.router}"})
        return router_command(engine, address, ports.router, ports.router_metrics, api_key), env
    if role != "trainer":
        raise LaunchError(f"unknown task role {role!r} (one of {', '.join(ROLES)})")
    if rank == 0:
        announce(plan, "master", {"address": address})
        master = address
    else:
        master = _wait_for_master(plan)
    env.update({"NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface, NODE_ADDRESS_ENV: address,
                # torchrun's SIGTERM handling kills its workers after this long: give them their checkpoint
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(plan.stop_grace_s + 60)), "PYTHONUNBUFFERED": "1"})
    argv = [plan.python, "-m", "torch.distributed.run", "--nnodes", str(len(plan.trainer_nodes)),
            "--nproc-per-node", str(plan.procs_per_node), "--node-rank", str(rank), "--master-addr", master,
            "--master-port", str(plan.ports.master), "-m", "megatron_opsd.cli", "train",
            f"{plan.log_dir}/{CONFIG_FILE}"]
    return argv, env


def _wait_for_master(plan: Plan) -> str:
    deadline = time.monotonic() + plan.startup_s
    while (master := announced(plan, "master")) is None:
        if time.monotonic() > deadline:
            raise LaunchError(f"trainer node 0 ({plan.trainer_nodes[0]}) did not announce its address within "
                              f"{plan.startup_s:g} s ({plan.log_dir}/{REGISTRY}/master.json)")
        time.sleep(0.5)
    return master["address"]
