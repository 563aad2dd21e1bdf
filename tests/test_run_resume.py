"""A training run stopped and resumed reproduces the uninterrupted one exactly: rollouts at the step and
drawn one step ahead (``rollout.async: 1``), tiny model, one process."""
from __future__ import annotations

import json

import pytest

from megatron_opsd.cli import main
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.loop import train
from tests.support.engines import failing_engine, raising
from tests.support.train_configs import load_train, losses, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_opsd_resume_reproduces_the_uninterrupted_run(tmp_path, hf_dir):
    whole = write_config(tmp_path / "whole", hf_dir)
    assert main(["train", str(whole)]) == 0
    run = tmp_path / "whole" / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # the engine sampled from exactly the trainer's weights
        assert r["mismatch/logprob_abs_diff_mean"] < 1e-4 and r["probe/logprob_abs_diff_max"] < 1e-4
        assert r["response_len_max"] <= 12 and r["divergence"] == r["loss"]
    assert "eval/avg@1" in records[-1] and (run / "eval" / "step_000003.json").is_file()
    assert (run / "metrics.png").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (run / "ckpt").glob("step_*")) == ["step_000002", "step_000003"]

    interrupted = write_config(tmp_path / "interrupted", hf_dir)
    with pytest.raises(KeyboardInterrupt):  # when asked for step 3's rollouts
        train(load_train(interrupted), failing_engine(3, raising(KeyboardInterrupt("killed"))))
    assert len(losses(tmp_path / "interrupted" / "run")) == 2
    assert main(["train", str(interrupted)]) == 0
    assert losses(tmp_path / "interrupted" / "run") == losses(run)


class Killed(Exception):
    pass


def test_async_rollouts_come_one_version_behind_and_resume_exactly(tmp_path, hf_dir):
    """rollout.async=1: step t's rollouts are drawn during step t-1 from the weights before it (lag
    1 after step 1, whose rollouts are the synchronous run's); a run that dies while drawing ahead
    resumes from its checkpoint, the drawn-ahead rollouts included, with the uninterrupted losses."""
    steps4 = {"steps": 4}
    at_step = write_config(tmp_path / "at_step", hf_dir, steps=1, checkpoint={"enabled": False}, eval={"data": None})
    assert main(["train", str(at_step)]) == 0
    whole = write_config(tmp_path / "whole", hf_dir, **steps4)
    assert main(["train", str(whole), "rollout.async=1"]) == 0
    records = read_metrics(tmp_path / "whole" / "run" / "metrics.jsonl")
    assert [r["rollout/weight_version_lag"] for r in records] == [0, 1, 1, 1]
    assert records[0]["loss"] == losses(tmp_path / "at_step" / "run")[0]
    assert all(r["mismatch/logprob_abs_diff_mean"] > 1e-3 for r in records[1:])  # sampled by older weights

    interrupted = write_config(tmp_path / "interrupted", hf_dir, **steps4)
    with pytest.raises(Killed):  # while it draws step 3's rollouts, during step 2
        train(load_train(interrupted, "rollout.async=1"), failing_engine(3, raising(Killed("killed"))))
    assert sorted(p.name for p in (tmp_path / "interrupted" / "run" / "ckpt").glob("step_*")) == ["step_000001"]
    assert main(["train", str(interrupted), "rollout.async=1"]) == 0
    assert losses(tmp_path / "interrupted" / "run") == losses(tmp_path / "whole" / "run")
