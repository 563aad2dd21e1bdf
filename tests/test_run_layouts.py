"""``opsd train`` under torchrun: two ranks (TP=2, PP=2) reproduce the single-process run, and an error
on rank 0 stops every rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opsd.cli import main
from megatron_opsd.platform import free_port
from megatron_opsd.tracking import read_metrics
from tests.support.train_configs import write_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun_train(config: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_opsd.cli", "train", str(config), *overrides]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_two_ranks_reproduce_the_single_process_run(tmp_path, hf_dir, layout):
    """Under torchrun: rollouts on rank 0 broadcast, the exporter and probe as collectives, the
    vocab-parallel log-probs (TP) and the last-stage metrics (PP) give the single-process numbers."""
    path = write_config(tmp_path, hf_dir, steps=2)
    assert main(["train", str(path), "checkpoint.enabled=false"]) == 0
    single = read_metrics(tmp_path / "run" / "metrics.jsonl")
    proc = torchrun_train(path, layout, "checkpoint.enabled=false", f"run_dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(single, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["mismatch/logprob_abs_diff_mean"] < 1e-4 and b["probe/logprob_abs_diff_max"] < 1e-4


def test_an_engine_error_on_rank_0_stops_every_rank(tmp_path, hf_dir):
    """The other ranks raise too, instead of waiting for rank 0 in a collective until the timeout."""
    proc = torchrun_train(write_config(tmp_path, hf_dir, steps=1), "eval.max_new_tokens=1000", timeout=120)
    assert proc.returncode != 0
    assert "ValueError: prompt 0: " in proc.stderr and "exceed the model's max_position_embeddings=256" in proc.stderr
    assert "RuntimeError: ValueError on rank 0: prompt 0: " in proc.stderr
