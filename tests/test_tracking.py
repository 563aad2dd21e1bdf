"""Metrics sinks: wandb offline, the JSONL file across a resume, non-finite values, the end-of-run plot."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_opsd.tracking import (
    METRICS_FILE,
    PLOT_FILE,
    WANDB_ID_FILE,
    Tracker,
    TrackingConfig,
    plot_metrics,
    read_metrics,
)

NO_WANDB = TrackingConfig(wandb=False)


def _strict(line: str) -> dict:
    """Parse as strict JSON: NaN / Infinity tokens are an error."""
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=reject)


def _lines(run_dir) -> list[dict]:
    return [_strict(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_wandb_offline_gets_the_same_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    run_dir = tmp_path / "run"
    tracker = Tracker(TrackingConfig(), run_dir, run_config={"loss": {"divergence": "jsd"}})
    run = tracker._wandb_run
    assert run.offline and run.config["loss"] == {"divergence": "jsd"}
    tracker.log({"loss": 0.5, "divergence": float("nan")}, step=1)
    tracker.log({"loss": np.float32(0.25), "divergence": torch.tensor(0.125), "phase": "warmup"}, step=2)
    # wandb commits a step's row (and its summary) when the next step arrives.
    assert run.summary["loss"] == 0.5 and math.isnan(run.summary["divergence"])
    tracker.log({"loss": 0.0}, step=3)
    assert run.summary["loss"] == 0.25 and run.summary["divergence"] == 0.125 and run.summary["phase"] == "warmup"
    tracker.close(plot=False)
    run_id = (run_dir / WANDB_ID_FILE).read_text()
    assert run.id == run_id
    assert list((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert [(r["step"], r["loss"], r.get("divergence")) for r in _lines(run_dir)] == [
        (1, 0.5, None), (2, 0.25, 0.125), (3, 0.0, None)]


@pytest.mark.parametrize("mode, env, project, expected", [
    (None, None, None, "offline"),
    (None, None, "opsd-sweep", "online"),
    (None, "disabled", "opsd-sweep", "disabled"),
    ("offline", "online", "opsd-sweep", "offline"),
])
def test_wandb_mode_is_offline_unless_configured(monkeypatch, mode, env, project, expected):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    assert TrackingConfig(mode=mode, project=project).wandb_mode() == expected


def test_resume_drops_steps_it_will_log_again_and_a_torn_line(tmp_path):
    with Tracker(NO_WANDB, tmp_path) as tracker:
        for step in range(6):
            tracker.log({"loss": 1.0 / (step + 1)}, step)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "lo')  # the crash tore this write
    tracker = Tracker(NO_WANDB, tmp_path, start_step=4)
    assert [r["step"] for r in _lines(tmp_path)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="steps must increase"):
        tracker.log({"loss": 0.0}, step=3)
    tracker.log({"loss": 0.1}, step=4)
    tracker.log({"loss": 0.2}, step=5)
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)][3:] == [(3, 0.25), (4, 0.1), (5, 0.2)]  # flushed
    tracker.close(plot=False)


def test_a_damaged_line_inside_the_file_is_an_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        Tracker(NO_WANDB, tmp_path, start_step=1)


def test_bad_values(tmp_path):
    with Tracker(NO_WANDB, tmp_path) as tracker:
        tracker.log({"loss": float("inf"), "grad_norm": float("-inf"), "divergence": float("nan"), "skipped": True}, 0)
        with pytest.raises(TypeError, match="metric 'lr': list"):
            tracker.log({"lr": [1e-5]}, 1)
        with pytest.raises(ValueError, match="reserved"):
            tracker.log({"step": 3}, 1)
    assert _lines(tmp_path) == [{"step": 0, "time": _lines(tmp_path)[0]["time"], "loss": None, "grad_norm": None,
                                 "divergence": None, "skipped": True}]
    (record,) = read_metrics(tmp_path / METRICS_FILE)
    assert math.isnan(record["loss"]) and math.isnan(record["divergence"])


def test_plot_draws_each_panel_from_the_jsonl(tmp_path):
    with Tracker(NO_WANDB, tmp_path) as tracker:
        for step in range(8):
            metrics = {"loss": 2.0 - 0.1 * step, "divergence": math.nan if step == 3 else 1.0 / (step + 1),
                       "grad_norm": 1.0, "phase": "opsd"}
            if step % 4 == 0:
                metrics |= {"eval/avg@4": 0.1 * step, "eval/maj@4": 0.2 * step, "eval/no_answer_rate": 0.5}
            tracker.log(metrics, step)
    png = tmp_path / PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    drawn = plot_metrics(tmp_path / METRICS_FILE, tmp_path / "again.png", TrackingConfig().plot)
    assert drawn == {"loss": ["loss"], "divergence": ["divergence"], "eval accuracy": ["eval/avg@4", "eval/maj@4"]}
    assert plot_metrics(tmp_path / METRICS_FILE, tmp_path / "empty.png", {"kl": ["kl/*"]}) == {"kl": []}
    tracker = Tracker(TrackingConfig(wandb=False, plot={}), tmp_path / "no_plot")
    tracker.log({"loss": 1.0}, 0)
    assert tracker.close() is None and not (tmp_path / "no_plot" / PLOT_FILE).exists()


def test_a_failed_run_writes_no_plot_and_other_ranks_write_nothing(tmp_path):
    with pytest.raises(RuntimeError), Tracker(NO_WANDB, tmp_path / "rank0") as tracker:
        tracker.log({"loss": 1.0}, 0)
        raise RuntimeError("step failed")
    assert (tmp_path / "rank0" / METRICS_FILE).exists() and not (tmp_path / "rank0" / PLOT_FILE).exists()
    with Tracker(TrackingConfig(), tmp_path / "rank1", enabled=False) as tracker:
        tracker.log({"loss": 1.0}, 0)
        assert list(tracker.progress(range(3), desc="steps")) == [0, 1, 2]
    assert not (tmp_path / "rank1").exists()
