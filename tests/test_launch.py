"""The SLURM launcher's planning, without SLURM: node lists, ports, settings, roles and layouts,
each task's command line, and the dry runs of slurm/opsd_70b.sh and slurm/opsd_8b.sh against
synthetic node lists (the jobs themselves run on a real SLURM in tests/test_slurm.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opsd.launch.config import LaunchConfig
from megatron_opsd.launch.network import Ports, fabric_interface
from megatron_opsd.launch.plan import Plan, make_plan
from megatron_opsd.launch.slurm import Job, LaunchError, expand_hostlist
from megatron_opsd.launch.task import announce, task_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[008-011,020],cpu7", ["gpu008", "gpu009", "gpu010", "gpu011", "gpu020", "cpu7"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_node_lists_expand_as_scontrol_does(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["n[1-2", "n[a-b]"])
def test_a_malformed_node_list_is_an_error_naming_it(nodelist):
    with pytest.raises(LaunchError, match=re.escape(nodelist)):
        expand_hostlist(nodelist)


def test_ports_come_from_the_job_id_below_the_ephemeral_range():
    ports = Ports.for_job(4321)
    assert ports.base == 11000 and ports.master == 11000 and ports.server(3) == 11106
    every = {ports.master, ports.router, ports.router_metrics, *(ports.sync + s for s in range(4)),
             *(f(i) for i in range(8) for f in (ports.server, ports.server_nccl))}
    assert len(every) == 3 + 4 + 16 and max(every) < 32768
    assert ports.errors(servers=8, stages=4) == []
    assert "ephemeral range" in " ".join(Ports(32000).errors(servers=1, stages=1))
    assert "at most 450" in " ".join(ports.errors(servers=451, stages=1))


def test_a_fabric_prefix_that_matches_nothing_fails_at_once_naming_the_interfaces():
    assert fabric_interface("127.") == ("lo", "127.0.0.1")
    with pytest.raises(LaunchError, match=r"no interface with an address starting with '203\.0\.113\.'.*lo 127"):
        fabric_interface("203.0.113.")


def test_settings_come_from_the_environment_and_bad_ones_name_their_variable():
    settings = LaunchConfig.from_env({"OPSD_TRAIN_NODES": "3", "OPSD_TP": "4", "OPSD_ON_STOP": "exit", "HOME": "/x"})
    assert (settings.train_nodes, settings.tp, settings.on_stop) == (3, 4, "exit")
    with pytest.raises(LaunchError, match="OPSD_TRAIN_NODES='two'"):
        LaunchConfig.from_env({"OPSD_TRAIN_NODES": "two"})
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST unset"):
        Job.from_env({"SLURM_JOB_ID": "7"})
    with pytest.raises(LaunchError, match="OPSD_SGLANG_TP is now OPSD_SERVER_TP"):
        LaunchConfig.from_env({"OPSD_SGLANG_TP": "4"})


def _job(nodes: int, gpus: int = 8, name: str = "t") -> Job:
    return Job(id=77, name=name, nodes=tuple(f"gpu{i:03d}" for i in range(1, nodes + 1)), cpus_per_node=96,
               gpus_per_node=gpus)


def _plan(nodes: int, config: str = "examples/llama3_70b.yaml", **settings) -> Plan:
    return make_plan(_job(nodes), LaunchConfig(**settings), REPO / config, [])


def test_a_70b_plan_on_16_nodes():
    plan = _plan(16, train_nodes=12, tp=8, pp=4, server_tp=4)
    assert plan.trainer_nodes == [f"gpu{i:03d}" for i in range(1, 13)] and len(plan.rollout_nodes) == 4
    assert (plan.tp, plan.pp, plan.dp) == (8, 4, 3) and plan.tp * plan.pp * plan.dp == 12 * 8
    assert len(plan.servers) == 8 and [s.base_gpu_id for s in plan.servers[:2]] == [0, 4]
    ports = [p for s in plan.servers for p in (s.port, s.nccl_port)]
    assert len(set(ports)) == len(ports) and plan.ports.master not in ports
    trainer = plan.step("trainer").srun
    assert "--nodes=12" in trainer and "--gpus-per-node=8" in trainer and "--exact" in trainer
    assert "--gpu-bind=none" in trainer and "--mem=0" in trainer  # whatever the site's defaults
    assert "--mem=0" not in plan.step("router").srun  # the router shares the servers' node
    assert "--ntasks-per-node=2" in plan.step("servers").srun and "--overlap" in plan.step("router").srun
    assert plan.config["rollout"]["engine"]["servers"]["tp"] == 4 and plan.config["parallel"] == {"tp": 8, "pp": 4}
    assert plan.config["checkpoint"]["stop_file"] == f"{plan.log_dir}/stop"


@pytest.mark.parametrize(("settings", "error"), [
    ({"train_nodes": 6}, "no node is left for servers"),
    ({"train_nodes": 3, "tp": 8, "pp": 4}, "24 trainer ranks .* not a multiple of TP 8 x PP 4"),
    ({"train_nodes": 4, "tp": 16, "pp": 1}, "TP 16 does not divide the 8 ranks of a node"),
    ({"train_nodes": 4, "server_tp": 3}, "the server TP must divide"),
    ({"train_nodes": 4, "port_base": 40000}, "ephemeral range"),
])
def test_a_plan_that_does_not_fit_says_why(settings, error):
    with pytest.raises(LaunchError, match=error):
        _plan(6, **settings)


def test_each_task_becomes_its_role_with_the_plan_s_addresses_and_ports(tmp_path):
    plan = _plan(6, train_nodes=4, tp=8, pp=4, server_tp=4, log_root=str(tmp_path))
    argv, env = task_command(plan, "server", "ib0", "10.0.0.5", {"SLURM_PROCID": "1", "OPSD_SGLANG_API_KEY": "k",
                                                                  "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    slot = plan.servers[1]
    assert argv[1:3] == ["-m", "sglang.launch_server"] and argv[argv.index("--host") + 1] == "10.0.0.5"
    assert argv[argv.index("--port") + 1] == str(slot.port)
    assert argv[argv.index("--nccl-port") + 1] == str(slot.nccl_port)
    assert argv[argv.index("--tp-size") + 1] == "4" and "--api-key=k" in argv
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "--base-gpu-id" not in argv  # its own GPUs of the node
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"  # its weight group uses the fabric too
    assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    argv, _ = task_command(plan, "router", "ib0", "10.0.0.5", {})
    assert "sglang_router.launch_router" in argv and argv[argv.index("--port") + 1] == str(plan.ports.router)
    announce(plan, "master", {"address": "10.0.0.1"})
    argv, env = task_command(plan, "trainer", "ib0", "10.0.0.2", {"SLURM_PROCID": "2"})
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    for flag, value in [("--nnodes", "4"), ("--nproc-per-node", "8"), ("--node-rank", "2"),
                        ("--master-addr", "10.0.0.1"), ("--master-port", str(plan.ports.master))]:
        assert argv[argv.index(flag) + 1] == value
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0" and env["OPSD_NODE_ADDRESS"] == "10.0.0.2"
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) > plan.stop_grace_s


def test_a_vllm_fleet_has_its_servers_on_the_rollout_nodes_and_no_router(tmp_path):
    plan = _plan(3, "examples/tiny_cpu_vllm.yaml", train_nodes=1, server_tp=2, log_root=str(tmp_path))
    assert plan.server_kind == "vllm" and not plan.uses_router and len(plan.servers) == 8
    assert {s.name for s in plan.steps} == {"servers", "trainer"}
    assert "8 vllm servers of TP 2, 4 per node; balanced by the trainer" in plan.describe()
    argv, env = task_command(plan, "server", "ib0", "10.0.0.7", {"SLURM_PROCID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert argv[argv.index("--port") + 1] == str(plan.servers[3].port) and "--tensor-parallel-size" in argv
    assert argv[argv.index("--host") + 1] == "10.0.0.7" and env["VLLM_HOST_IP"] == "10.0.0.7"
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and env["VLLM_SERVER_DEV_MODE"] == "1"
    config = plan.training_config(["http://10.0.0.7:1"], None)
    assert config["rollout"]["engine"]["urls"] == ["http://10.0.0.7:1"] and "router" not in config["rollout"]["engine"]


def test_the_plan_survives_its_file(tmp_path):
    plan = _plan(6, train_nodes=4)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_the_trainer_config_adopts_the_fleet():
    plan = _plan(6, train_nodes=4)
    config = plan.training_config(["http://10.0.0.5:1", "http://10.0.0.6:1"], "http://10.0.0.5:2")
    assert config["rollout"]["engine"]["urls"] == ["http://10.0.0.5:1", "http://10.0.0.6:1"]
    assert config["rollout"]["engine"]["router"]["url"] == "http://10.0.0.5:2"
    assert plan.config["rollout"]["engine"]["urls"] is None  # the plan's own stays as it was


def _dry_run(script: str, nodelist: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OPSD_"))}
    environ |= {"OPSD_DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": Path(script).stem,
                "SLURM_JOB_NODELIST": nodelist, "OPSD_PYTHON": sys.executable, **env}
    done = subprocess.run(["bash", script], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(("script", "nodelist", "env", "trainer", "rollout"), [
    ("slurm/opsd_70b.sh", "gpu[001-016]", {"OPSD_TRAIN_NODES": "12"},
     "trainer: 12 nodes \\(gpu001, .*gpu012\\) x 8 ranks \\(8 GPUs\\) = 96 ranks: TP 8 x PP 4 x DP 3",
     "rollout: 4 nodes \\(gpu013, gpu014, gpu015, gpu016\\): 4 sglang servers of TP 8, 1 per node"),
    ("slurm/opsd_70b.sh", "gpu[001-006]", {}, "4 nodes .* = 32 ranks: TP 8 x PP 4 x DP 1", "2 sglang servers of TP 8"),
    ("slurm/opsd_8b.sh", "gpu[01-02]", {}, "1 nodes \\(gpu01\\) x 8 ranks .* TP 2 x PP 1 x DP 4",
     "rollout: 1 nodes \\(gpu02\\): 4 sglang servers of TP 2, 4 per node"),
])
def test_the_cluster_scripts_dry_run_against_synthetic_node_lists(script, nodelist, env, trainer, rollout):
    out = _dry_run(script, nodelist, **env)
    assert re.search(trainer, out) and re.search(rollout, out), out[:2000]
    servers = re.findall(r"server \d+: (\S+):(\d+) \(nccl (\d+)", out)
    ports = [p for _, port, nccl in servers for p in (port, nccl)]
    assert servers and len(set(ports)) == len(ports)
    steps = {name: line for name, line in re.findall(r"^  (router|servers|trainer): (srun .*)$", out, re.MULTILINE)}
    assert set(steps) == {"router", "servers", "trainer"} and "launch task trainer" in steps["trainer"]
    assert not (REPO / "logs" / f"{Path(script).stem}-4242").exists()  # printed, nothing started or written


def test_a_launch_without_model_weights_fails_before_starting_anything(tmp_path):
    from megatron_opsd.launch.run import launch

    plan = _plan(6, train_nodes=4, log_root=str(tmp_path), fabric_prefix="127.")
    with pytest.raises(LaunchError, match="examples/models/llama3_70b has no \\*.safetensors weights"):
        launch(plan)
    assert not any(tmp_path.iterdir())


def test_a_server_api_key_that_begins_with_a_dash_is_still_one_argument():
    """secrets.token_urlsafe starts one key in 64 with '-': as a separate word argparse took it for a flag."""
    from megatron_opsd.cli import parse
    from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
    from megatron_opsd.rollout.sglang.fleet import server_command

    cfg = SGLangEngineConfig(kind="sglang", servers={"command": ["python", "-m", "megatron_opsd.cli", "serve"]})
    argv = server_command(cfg, "/m", "127.0.0.1", 30000, 0, "dummy", api_key="-Xy_z")
    assert parse(argv[argv.index("serve"):]).api_key == "-Xy_z"
    done = subprocess.run([sys.executable, "-m", "sglang_router.launch_router", "--api-key=-Xy_z", "--help"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
