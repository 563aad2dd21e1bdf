"""The plan of one SLURM job: which nodes do what, every srun line, every port, the training
config. Made once by the batch script's ``opsd launch`` (and printed whole by a dry run), read by
the job steps' ``opsd launch task`` (``plan.json`` in the job's log directory).

Roles: the first ``OPSD_TRAIN_NODES`` nodes run the trainer (one torchrun per node), the others
the rollout servers, SGLang's or vLLM's (``rollout.engine.kind``; ``OPSD_SERVERS_PER_NODE`` each, of
``OPSD_SERVER_TP`` GPUs), and, for SGLang, the router on the first of them (the trainer balances
vLLM's servers itself). Each role is one background ``srun``; every server task sees its node's
GPUs (``--gpu-bind=none``) and takes its own ``OPSD_SERVER_TP`` of them (``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_opsd.config import load_config
from megatron_opsd.launch.config import LaunchConfig
from megatron_opsd.launch.network import Ports
from megatron_opsd.launch.slurm import Job, LaunchError

ROLES = ("server", "router", "trainer")  # what a job step's task runs (opsd launch task ROLE)
FLEET_KINDS = ("sglang", "vllm")  # the rollout engines whose servers the job starts on its rollout nodes
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.yaml"  # the training config the trainer runs (with the fleet's URLs)
STOP_FILE = "stop"  # written by the launcher when the batch script is asked to stop (checkpoint.stop_file)


@dataclass(frozen=True)
class ServerSlot:
    """Server ``index`` (its srun task's SLURM_PROCID): where it runs and listens."""

    index: int
    node: str
    port: int
    nccl_port: int
    base_gpu_id: int  # its first GPU among its node's (it takes server_tp from there)


@dataclass(frozen=True)
class Step:
    """One background job step: its name (srun ``--job-name``), nodes and command line."""

    name: str
    nodes: list[str]
    srun: list[str]


@dataclass
class Plan:
    job: Job
    trainer_nodes: list[str]
    rollout_nodes: list[str]
    gpus_per_node: int
    procs_per_node: int
    tp: int
    pp: int
    server_kind: str | None  # sglang, vllm, or None: no fleet
    server_tp: int
    servers: list[ServerSlot]
    fabric_prefix: str | None
    port_base: int
    run_dir: str
    log_dir: str
    config: dict[str, Any]  # the training config, the fleet's URLs left out (known once it runs)
    model_path: str  # what the servers load at start (a weight sync brings the trainer's weights)
    load_format: str | None
    startup_s: float
    on_stop: str
    overrides: list[str] = field(default_factory=list)  # the command line's, passed on to a resubmission
    python: str = sys.executable
    steps: list[Step] = field(default_factory=list)

    @property
    def ports(self) -> Ports:
        return Ports(self.port_base)

    @property
    def dp(self) -> int:
        return len(self.trainer_nodes) * self.procs_per_node // (self.tp * self.pp)

    @property
    def uses_fleet(self) -> bool:
        return bool(self.servers)

    @property
    def uses_router(self) -> bool:
        return self.server_kind == "sglang" and self.config["rollout"]["engine"]["router"]["enabled"]

    @property
    def stop_grace_s(self) -> float:
        return float(self.config["checkpoint"]["stop_grace_s"])

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def training_config(self, server_urls: list[str], router_url: str | None) -> dict[str, Any]:
        """The config the trainer runs: this plan's, adopting the servers and the router."""
        config = copy.deepcopy(self.config)
        if self.uses_fleet:
            config["rollout"]["engine"]["urls"] = server_urls
        if self.uses_router:
            config["rollout"]["engine"]["router"]["url"] = router_url
        return config

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Plan:
        raw = json.loads(path.read_text())
        raw["job"] = Job(**{**raw["job"], "nodes": tuple(raw["job"]["nodes"])})
        raw["servers"] = [ServerSlot(**s) for s in raw["servers"]]
        raw["steps"] = [Step(**s) for s in raw["steps"]]
        return cls(**raw)

    # -- what a dry run prints -------------------------------------------------------------------

    def describe(self) -> str:
        ports, job = self.ports, self.job
        gpus = f"{self.gpus_per_node} GPUs" if self.gpus_per_node else "CPUs"
        lines = [
            (f"job {job.id} ({job.name}), {len(job.nodes)} nodes, restart {job.restart_count}; "
            f"logs {self.log_dir}, run {self.run_dir}"),
            (f"trainer: {len(self.trainer_nodes)} nodes ({', '.join(self.trainer_nodes)}) x {self.procs_per_node} "
             f"ranks ({gpus}) = {len(self.trainer_nodes) * self.procs_per_node} ranks: TP {self.tp} x PP {self.pp} "
             f"x DP {self.dp}"),
        ]
        if self.uses_fleet:
            router = f"router on {self.rollout_nodes[0]}" if self.uses_router else "balanced by the trainer"
            lines.append(f"rollout: {len(self.rollout_nodes)} nodes ({', '.join(self.rollout_nodes)}): "
                         f"{len(self.servers)} {self.server_kind} servers of TP {self.server_tp}, "
                         f"{len(self.servers) // len(self.rollout_nodes)} per node; {router}")
        fabric = f"addresses starting with {self.fabric_prefix!r}" if self.fabric_prefix else \
            "the address each node's host name resolves to"
        lines += [f"fabric: {fabric}, resolved on each node; NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME: its interface",
                  (f"ports: master {ports.master}, router {ports.router} (metrics {ports.router_metrics}), weight sync "
                  f"{ports.sync}+stage, servers from {ports.server(0)} (each with an NCCL port after it)")]
        for s in self.servers:
            gpu_ids = f", GPUs {s.base_gpu_id}-{s.base_gpu_id + self.server_tp - 1}" if self.gpus_per_node else ""
            lines.append(f"  server {s.index}: {s.node}:{s.port} (nccl {s.nccl_port}{gpu_ids})")
        lines.append(f"servers start from: {self.model_path}" + (f" ({self.load_format})" if self.load_format else ""))
        lines.append("steps:")
        lines += [f"  {s.name}: {' '.join(s.srun)}" for s in self.steps]
        urls = "; rollout.engine.urls" + (" and router.url are" if self.uses_router else " is") + \
            " filled in once the servers answer" if self.uses_fleet else ""
        lines.append(f"training config ({CONFIG_FILE}{urls}):")
        lines += ["  " + line for line in yaml.safe_dump(self.config, sort_keys=False).splitlines()]
        return "\n".join(lines)


def make_plan(job: Job, launch: LaunchConfig, config_path: Path, overrides: list[str]) -> Plan:
    """The plan of ``job``: roles, layout and ports checked, the training config validated."""
    from megatron_opsd.train.config import TrainConfig

    gpus = launch.gpus_per_node if launch.gpus_per_node is not None else (job.gpus_per_node or 0)
    procs = launch.procs_per_node or gpus or 1
    ports = Ports.for_job(job.id, launch.port_base)
    run_dir = launch.run_dir or f"runs/{job.name}"
    log_dir = f"{launch.log_root}/{job.name}-{job.id}" + (f"-r{job.restart_count}" if job.restart_count else "")
    ours = [f"run_dir={run_dir}", f"checkpoint.stop_file={log_dir}/{STOP_FILE}"]
    ours += [f"parallel.{k}={v}" for k, v in (("tp", launch.tp), ("pp", launch.pp)) if v]
    cfg = load_config(TrainConfig, config_path, [*overrides, *ours])
    kind = cfg.rollout.engine.kind if cfg.rollout.engine.kind in FLEET_KINDS else None
    if kind:
        cfg.rollout.engine.servers.tp = launch.server_tp or cfg.rollout.engine.servers.tp
        cfg.rollout.sync.port = ports.sync

    trainer_nodes, rollout_nodes = list(job.nodes[:launch.train_nodes]), list(job.nodes[launch.train_nodes:])
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    server_tp = cfg.rollout.engine.servers.tp if kind else 0
    per_node = (launch.servers_per_node or (gpus // server_tp if gpus else 1)) if kind else 0
    errors = _layout_errors(job, launch, gpus, procs, tp, pp, kind, server_tp, per_node, len(rollout_nodes))
    errors += ports.errors(len(rollout_nodes) * per_node, pp)
    if errors:
        raise LaunchError("the job's plan does not fit:\n  " + "\n  ".join(errors))
    servers = [ServerSlot(i, node, ports.server(i), ports.server_nccl(i), base_gpu_id=local * server_tp)
               for i, (node, local) in enumerate((n, k) for n in rollout_nodes for k in range(per_node))]
    model_path = cfg.model.hf or f"{run_dir}/launch/model"
    plan = Plan(job=job, trainer_nodes=trainer_nodes, rollout_nodes=rollout_nodes, gpus_per_node=gpus,
                procs_per_node=procs, tp=tp, pp=pp, server_kind=kind, server_tp=server_tp, servers=servers,
                fabric_prefix=launch.fabric_prefix, port_base=ports.base, run_dir=run_dir, log_dir=log_dir,
                config=cfg.model_dump(mode="json"), model_path=model_path,
                load_format=None if cfg.model.hf else "dummy", startup_s=launch.startup_s, on_stop=launch.on_stop,
                overrides=list(overrides))
    plan.steps = _steps(plan, per_node, job.cpus_per_node)
    return plan


def _layout_errors(job: Job, launch: LaunchConfig, gpus: int, procs: int, tp: int, pp: int, kind: str | None,
                   server_tp: int, per_node: int, rollout_nodes: int) -> list[str]:
    errors = []
    ranks = launch.train_nodes * procs
    if launch.train_nodes > len(job.nodes):
        errors.append(f"OPSD_TRAIN_NODES={launch.train_nodes} but the job has {len(job.nodes)} nodes")
    if ranks % (tp * pp):
        errors.append(f"{ranks} trainer ranks ({launch.train_nodes} nodes x {procs}) are not a multiple of "
                      f"TP {tp} x PP {pp}")
    if gpus and procs % tp:
        errors.append(f"TP {tp} does not divide the {procs} ranks of a node (tensor parallelism stays within a node)")
    if gpus and procs > gpus:
        errors.append(f"{procs} trainer ranks per node but {gpus} GPUs")
    if kind and rollout_nodes == 0:
        errors.append(f"rollout.engine.kind is {kind} but no node is left for servers ({len(job.nodes)} nodes, "
                      f"OPSD_TRAIN_NODES={launch.train_nodes})")
    if not kind and rollout_nodes:
        errors.append(f"{rollout_nodes} nodes beyond OPSD_TRAIN_NODES would sit idle: rollout.engine.kind is not "
                      f"{' or '.join(FLEET_KINDS)}")
    if kind and gpus and (gpus % server_tp or per_node * server_tp > gpus):
        errors.append(f"{per_node} servers of TP {server_tp} do not fit a node's {gpus} GPUs (the server TP must "
                      f"divide them)")
    return errors


def _steps(plan: Plan, servers_per_node: int, cpus_per_node: int | None) -> list[Step]:
    """The srun of each role. Steps that share a node need ``--exact`` (a step takes every CPU
    otherwise) or ``--overlap`` (the router, beside the servers); ``--kill-on-bad-exit`` ends a
    role when one of its tasks fails, so that the launcher sees it at once. A step of its own
    nodes takes all of their memory (``--mem=0``, whatever the site's DefMemPerCPU) and shows
    every task all of their GPUs (``--gpu-bind=none``: the tasks choose theirs)."""
    log_dir, task = plan.log_dir, [plan.python, "-m", "megatron_opsd.cli", "launch", "task"]
    plan_file = f"{log_dir}/{PLAN_FILE}"

    def srun(name: str, nodes: list[str], per_node: int, log: str, *, share: bool = False) -> list[str]:
        line = ["srun", f"--job-name={name}", f"--nodes={len(nodes)}", f"--nodelist={','.join(nodes)}",
                f"--ntasks-per-node={per_node}", "--overlap" if share else "--exact", "--kill-on-bad-exit=1",
                f"--output={log}", "--open-mode=append"]
        if cpus_per_node and not share:
            line.append(f"--cpus-per-task={max(1, cpus_per_node // per_node)}")
        if not share:
            line.append("--mem=0")
        if plan.gpus_per_node and not share:
            line += [f"--gpus-per-node={plan.gpus_per_node}", "--gpu-bind=none"]
        return line

    steps = []
    if plan.uses_router:
        first = plan.rollout_nodes[:1]
        steps.append(Step("router", first, [*srun("router", first, 1, f"{log_dir}/router.log", share=True),
                                            *task, "router", plan_file]))
    if plan.uses_fleet:
        steps += [Step("servers", plan.rollout_nodes,
                       [*srun("servers", plan.rollout_nodes, servers_per_node, f"{log_dir}/server-%t.log"),
                        *task, "server", plan_file])]
    trainer = srun("trainer", plan.trainer_nodes, 1, f"{log_dir}/trainer-%t.log")
    steps.append(Step("trainer", plan.trainer_nodes, [*trainer, *task, "trainer", plan_file]))
    return steps
