"""Weight sync by vLLM's weight-transfer protocol (``rollout.sync.kind: distributed``, the servers'
gloo backend) into a real vLLM CPU server, from a trainer on two ranks: PP=2 (stage 1's tensors
reach the server through rank 0) and TP=2 (each tensor gathered first).

Each check builds the run's components with the product's factory, shifts every weight (the server
starts from random ones anyway), pushes one version, and lets the probe check compare the server's
log-probs with the trainer's forward: a tensor lost, misplaced or relayed wrongly shows there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opsd.train.components import build_components
from tests.support.distributed import run_checks
from tests.support.processes import VLLM_PYTHON
from tests.workers.trainer_common import config, work_path

SERVER = (f"rollout.engine={{kind: vllm, servers: {{count: 1, command: [{VLLM_PYTHON}, -m, "
          "vllm.entrypoints.openai.api_server], args: [--enforce-eager], env: {VLLM_CPU_KVCACHE_SPACE: '1'}, "
          "weight_transfer: gloo}, timeouts: {startup_s: 300, control_s: 120}}")


def _push(name: str, *layout: str) -> None:
    run_dir = work_path(name)
    c = build_components(config(SERVER, "rollout.sync.kind=distributed", "rollout.sync.probe_tolerance=1e-4",
                                f"run_dir={run_dir}", *layout))
    try:
        with torch.no_grad():
            for p in c.chunks[0].parameters():
                p.add_(0.01)
        metrics = c.weight_sync.push(version=5)
        assert metrics["probe/logprob_abs_diff_max"] < 1e-4 and metrics["weight_sync/servers_restarted"] == 0, metrics
        if dist.get_rank() == 0:
            assert [s.weight_version() for s in c.engine.fleet.servers] == ["5"]
            assert not (run_dir / "weights").exists(), "the version went by disk"
    finally:
        if c.engine is not None:
            c.engine.close()


def check_vllm_transfer_pp2():
    _push("vllm_transfer_pp2", "parallel.pp=2")


def check_vllm_transfer_tp2():
    _push("vllm_transfer_tp2", "parallel.tp=2")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
