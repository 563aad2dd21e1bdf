"""``opsd demo``: the warm-up, OPSD and SFT phases and the summary line; the shipped config shortened repeats
itself exactly."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_opsd.cli import main
from megatron_opsd.tracking import read_metrics
from tests.support.train_configs import write_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_warmup_opsd_and_sft_and_prints_the_summary_line(tmp_path, hf_dir, capsys):
    path = write_config(tmp_path, hf_dir, steps=1, checkpoint={"interval": 1})
    assert main(["demo", str(path), "--warmup-steps", "1", "--warmup-prompts-per-step", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert last == (f"demo: base {summary['base']:.1%} -> opsd {summary['opsd']:.1%} (sft {summary['sft']:.1%}) "
                    f"in {summary['seconds']:.0f} s")
    assert re.fullmatch(r"demo: base \d+\.\d% -> opsd \d+\.\d% \(sft \d+\.\d%\) in \d+ s", last)
    assert (tmp_path / "run" / "warmup" / "hf" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "opsd" / "metrics.jsonl")] == [0, 1]
    # Started again with the same settings it resumes: every phase has finished, the same line again.
    assert main(["demo", str(path), "--warmup-steps", "1", "--warmup-prompts-per-step", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "demo: resuming the demo in" in out[0] and out[-1].split(" in ")[0] == last.split(" in ")[0]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "opsd" / "metrics.jsonl")] == [0, 1]
    assert main(["demo", str(path)]) == 2  # other settings in the same directory are refused, by name
    assert "holds a demo with other settings (warm-up steps: 1 -> 600; warm-up prompts_per_step: 3 -> 32)" in \
        capsys.readouterr().err


def test_the_shipped_demo_config_runs_the_demo_reproducibly(tmp_path, monkeypatch, capsys):
    """``make demo``'s config as shipped (paths from the repo root, random model, custom prompts),
    shortened to a few steps per phase; a second run with the same seed repeats the first exactly."""
    monkeypatch.chdir(REPO)

    def demo(name: str) -> Path:
        args = ["demo", "examples/tiny_cpu.yaml", f"run_dir={tmp_path / name}", "steps=2", "prompts_per_step=2",
                "rollout.max_new_tokens=8", "eval.limit=4", "eval.max_new_tokens=8", "checkpoint.interval=1",
                "tracking.wandb=false", "tracking.progress=false", "--warmup-steps", "2",
                "--warmup-prompts-per-step", "2"]
        assert main(args) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("demo: base ")
        return tmp_path / name

    first, second = demo("first"), demo("second")
    for phase in ("warmup", "opsd", "sft"):
        runs = [[{k: v for k, v in r.items() if k == "loss" or k.startswith("eval/")}
                 for r in read_metrics(run / phase / "metrics.jsonl")] for run in (first, second)]
        assert runs[0] == runs[1] and any("loss" in r for r in runs[0]), phase
    summary = json.loads((first / "summary.json").read_text())
    assert summary["warmup"] == {"steps": 2, "lr": 3e-3, "prompts_per_step": 2, "teacher_prompt_fraction": 0.5}
    lrs = [r["lr"] for r in read_metrics(first / "warmup" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(3e-3) and lrs[1] < lrs[0] and lrs[1] >= 3e-4  # the cosine towards a tenth
