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
from megatron_opsd.launch.plan import CONFIG_FILE, ROLES, Plan, ServerSlot
from megatron_opsd.launch.slurm import LaunchError
from megatron_opsd.rollout.factory import API_KEY_ENV
from megatron_opsd.rollout.sglang import fleet as sglang_fleet
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sync.distributed import NODE_ADDRESS_ENV
from megatron_opsd.rollout.vllm import engine as vllm_engine
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig

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
    """(command line, environment) of this task of ``role``, announced in the registry. Every task
    talks NCCL and gloo over the fabric's ``interface`` (a server's weight group too)."""
    rank = int(env.get("SLURM_PROCID", "0"))
    api_key = env.get(API_KEY_ENV)
    env = {**env, "NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface}
    if role == "server":
        return _server(plan, plan.servers[rank], address, api_key, env)
    if role == "router":
        ports = plan.ports
        announce(plan, "router", {"url": f"http://{address}:{ports.router}"})
        engine = SGLangEngineConfig.model_validate(plan.config["rollout"]["engine"])
        return sglang_fleet.router_command(engine, address, ports.router, ports.router_metrics, api_key), env
    if role != "trainer":
        raise LaunchError(f"unknown task role {role!r} (one of {', '.join(ROLES)})")
    if rank == 0:
        announce(plan, "master", {"address": address})
        master = address
    else:
        master = _wait_for_master(plan)
    env.update({NODE_ADDRESS_ENV: address,
                # torchrun's SIGTERM handling kills its workers after this long: give them their checkpoint
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(plan.stop_grace_s + 60)), "PYTHONUNBUFFERED": "1"})
    argv = [plan.python, "-m", "torch.distributed.run", "--nnodes", str(len(plan.trainer_nodes)),
            "--nproc-per-node", str(plan.procs_per_node), "--node-rank", str(rank), "--master-addr", master,
            "--master-port", str(plan.ports.master), "-m", "megatron_opsd.cli", "train",
            f"{plan.log_dir}/{CONFIG_FILE}"]
    return argv, env


def _server(plan: Plan, slot: ServerSlot, address: str, api_key: str | None,
            env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Server ``slot``'s command line and environment: SGLang's or vLLM's, on its own GPUs."""
    raw = plan.config["rollout"]["engine"]
    if plan.server_kind == "vllm":
        engine = VLLMEngineConfig.model_validate(raw)
        argv = vllm_engine.server_command(engine, plan.model_path, address, slot.port, plan.load_format, api_key)
        env |= vllm_engine.server_env(engine, address)
    else:
        engine = SGLangEngineConfig.model_validate(raw)
        argv = sglang_fleet.server_command(engine, plan.model_path, address, slot.port, 0, plan.load_format, api_key,
                                           ["--nccl-port", str(slot.nccl_port)])
        env |= sglang_fleet.server_env()
    if plan.gpus_per_node:  # the step shows every task its node's GPUs (--gpu-bind=none)
        visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(plan.gpus_per_node)))).split(",")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[slot.base_gpu_id:slot.base_gpu_id + plan.server_tp])
    announce(plan, f"server-{slot.index}", {"url": f"http://{address}:{slot.port}", "node": slot.node})
    return argv, env


def _wait_for_master(plan: Plan) -> str:
    deadline = time.monotonic() + plan.startup_s
    while (master := announced(plan, "master")) is None:
        if time.monotonic() > deadline:
            raise LaunchError(f"trainer node 0 ({plan.trainer_nodes[0]}) did not announce its address within "
                              f"{plan.startup_s:g} s ({plan.log_dir}/{REGISTRY}/master.json)")
        time.sleep(0.5)
    return master["address"]
