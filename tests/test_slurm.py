"""slurm/opsd_tiny.sh on a real SLURM: a controller and two emulated nodes on this machine
(``tools/local_slurm.sh start``; ``.ci/run`` starts it and sets OPSD_REQUIRE_SLURM=1, so that CI
fails rather than skips when it is not up). Node 1 runs the two-rank torchrun trainer (TP 2),
node 2 the two stand-in servers and the real router."""
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_opsd.launch.plan import Plan
from megatron_opsd.launch.slurm import expand_hostlist, hostnames
from megatron_opsd.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = ["steps=6", "checkpoint.interval=2", "eval.limit=8"]


def _slurm_is_up() -> bool:
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20, check=False)
        return states.stdout.split() == ["idle"]
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not _slurm_is_up():
        if os.environ.get("OPSD_REQUIRE_SLURM"):
            pytest.fail("OPSD_REQUIRE_SLURM is set but SLURM is not up with idle nodes (tools/local_slurm.sh start)")
        pytest.skip("no SLURM here (tools/local_slurm.sh start, then SLURM_CONF=... to run these)")


class Job:
    """One ``sbatch --wait slurm/opsd_tiny.sh`` with its run and logs under ``root``."""

    def __init__(self, root: Path, overrides: list[str], **env: str):
        self.root = root
        environ = {k: v for k, v in os.environ.items() if not k.startswith("OPSD_")}
        environ |= {"OPSD_PYTHON": sys.executable, "OPSD_RUN_DIR": str(root / "run"),
                    "OPSD_LOG_ROOT": str(root / "logs"), **env}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", f"--output={root}/%x-%j.out", "slurm/opsd_tiny.sh", *overrides],
            cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.id = int(self.process.stdout.readline().strip().split(";")[0])

    def wait(self, timeout: float = 600) -> int:
        self.process.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        return self.process.returncode

    @property
    def output(self) -> str:
        return (self.root / f"opsd-tiny-{self.id}.out").read_text(errors="replace")

    def log_dir(self, restart: int = 0) -> Path:
        return self.root / "logs" / (f"opsd-tiny-{self.id}" + (f"-r{restart}" if restart else ""))

    def metrics(self) -> list[dict]:
        path = self.root / "run" / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def leftovers(self) -> list[str]:
        """Processes of this job still alive: any naming its files, any listening on its ports."""
        plan = Plan.load(self.log_dir() / "plan.json")
        ports = {plan.ports.master, plan.ports.router, plan.ports.router_metrics,
                 *(p for s in plan.servers for p in (s.port, s.nccl_port))}
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(self.root) in " ".join(proc.info["cmdline"] or ()):
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])}")
        found += [f"port {c.laddr.port} (pid {c.pid})" for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
        return found


def _losses(job: Job) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in job.metrics() if "loss" in r}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Job:
    job = Job(tmp_path_factory.mktemp("whole"), STEPS)
    job.code = job.wait()
    return job


def test_the_tiny_job_trains_through_the_fleet_and_logs_where_the_script_says(whole):
    assert whole.code == 0, whole.output[-4000:]
    records = [r for r in whole.metrics() if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:  # each sync checked every server's version and passed the probe check
        assert record["rollout/weight_version_lag"] == 0 and record["weight_sync/servers_restarted"] == 0
        assert record["probe/logprob_abs_diff_max"] < 1e-3
    logs = whole.log_dir()
    assert {p.name for p in logs.iterdir()} >= {"plan.json", "config.yaml", "trainer-0.log", "server-0.log",
                                                "server-1.log", "router.log", "registry"}
    plan = Plan.load(logs / "plan.json")
    assert (plan.trainer_nodes, plan.rollout_nodes) == (["n1"], ["n2"]) and (plan.tp, plan.dp) == (2, 1)
    assert "[launch]" in whole.output and "the trainer finished" in whole.output
    assert whole.leftovers() == []


def test_a_signalled_job_checkpoints_is_requeued_and_resumes_exactly(whole, tmp_path):
    job = Job(tmp_path, STEPS)
    deadline = time.monotonic() + 300
    while len([r for r in job.metrics() if "loss" in r]) < 2:
        assert job.process.poll() is None and time.monotonic() < deadline, "the job ended before it was signalled"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", str(job.id)], check=True)  # as --signal=B:TERM@N does
    assert job.wait() == 0, job.output[-4000:]
    assert "requeueing the job" in job.output and job.log_dir(restart=1).is_dir()
    stopped = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert sorted(stopped) == list(range(1, 7)), stopped  # each step once
    assert _losses(job) == _losses(whole)
    assert job.leftovers() == []


def test_a_server_that_fails_to_start_fails_the_job_with_its_log(tmp_path):
    job = Job(tmp_path, [*STEPS, "rollout.engine.servers.args=[--no-such-flag]"], OPSD_STARTUP_S="120")
    assert job.wait() != 0
    assert job.seconds < 120 and "step servers ended" in job.output, job.output[-3000:]
    assert "--no-such-flag" in job.output and "server-0.log" in job.output  # the server's own log tail
    assert job.leftovers() == []


def test_node_lists_expand_as_scontrol_does():
    for nodelist in ("n[1-2]", "gpu[008-011,020],cpu7", "rack[1-2]-n[01-02]"):
        assert hostnames(nodelist) == expand_hostlist(nodelist)
        assert subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True).stdout.split() == expand_hostlist(nodelist)


def test_a_signalled_job_can_hand_over_to_a_singleton_successor(tmp_path):
    job = Job(tmp_path, ["steps=4", "checkpoint.interval=2", "eval.limit=8"], OPSD_ON_STOP="resubmit")
    while not [r for r in job.metrics() if "loss" in r]:
        assert job.process.poll() is None, "the job ended before it was signalled"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", str(job.id)], check=True)
    assert job.wait() == 0, job.output[-4000:]
    successor = int(job.output.split("resubmitted as job ")[1].split()[0])
    deadline = time.monotonic() + 300
    def queued() -> bool:
        return bool(subprocess.run(["squeue", "-h", "-j", str(successor)], capture_output=True, text=True,
                                   check=False).stdout.strip())

    while queued():
        assert time.monotonic() < deadline, f"job {successor} still queued or running"
        time.sleep(1)
    assert "the trainer finished" in job.output  # the successor appended to the same output
    assert sorted(r["step"] for r in job.metrics() if "loss" in r) == [1, 2, 3, 4]
