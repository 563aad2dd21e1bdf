"""``opsd compare``: accuracy against step and cumulative generated tokens, from the runs' own files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_opsd.cli import main
from megatron_opsd.compare import CompareError, compare_runs, table
from tests.support.train_configs import REPO, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_run(root: Path, name: str, algorithm: str, records: list[dict], k: int = 1) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": algorithm}, "eval": {"k": k}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **r}) + "\n" for r in records))
    return run


def test_tokens_are_cumulative_and_the_best_is_the_first_step_reaching_it(tmp_path):
    opsd = fake_run(tmp_path, "opsd", "opsd", [
        {"step": 0, "eval/avg@1": 0.2},
        {"step": 1, "rollout/generated_tokens": 100.0, "loss": 1.0},
        {"step": 2, "rollout/generated_tokens": 50.0, "eval/avg@1": 0.5},
        {"step": 3, "rollout/generated_tokens": 70.0},
        {"step": 4, "rollout/generated_tokens": 30.0, "eval/avg@1": 0.5}])
    sft = fake_run(tmp_path, "sft", "sft", [{"step": 0, "eval/avg@1": 0.2}, {"step": 2, "eval/avg@1": 0.6}])
    comparison = compare_runs([opsd, sft])
    assert comparison.metric == "eval/avg@1"
    a, b = comparison.runs
    assert [(p.step, p.generated_tokens, p.accuracy) for p in a.points] == [(0, 0, 0.2), (2, 150, 0.5), (4, 250, 0.5)]
    assert (a.best.step, a.best.generated_tokens, a.generated_tokens, a.steps) == (2, 150, 250, 4)
    assert (b.best.step, b.generated_tokens) == (2, 0)
    lines = table(comparison).splitlines()
    assert lines[0].startswith("| run | algorithm | best avg@1 | at step | generated tokens to best |")
    assert lines[2] == "| opsd | opsd | 50.0% | 2 | 150 | 50.0% (4) | 250 |"
    assert lines[3] == "| sft | sft | 60.0% | 2 | 0 | 60.0% (2) | 0 |"


def test_runs_that_cannot_be_compared_are_named(tmp_path):
    with pytest.raises(CompareError, match=f"{tmp_path / 'missing'}: no config.yaml"):
        compare_runs([tmp_path / "missing"])
    no_eval = fake_run(tmp_path, "no_eval", "opsd", [{"step": 1, "rollout/generated_tokens": 5.0, "loss": 1.0}])
    with pytest.raises(CompareError, match="no eval/avg@1 logged .*is eval.data set"):
        compare_runs([no_eval])
    old = fake_run(tmp_path, "old", "grpo", [{"step": 1, "loss": 1.0, "eval/avg@1": 0.1}])
    with pytest.raises(CompareError, match="a grpo run that logs no rollout/generated_tokens"):
        compare_runs([old])


def test_three_short_runs_make_the_table_and_the_png(tmp_path, hf_dir, capsys):
    evaluated = {"data": {"path": str(REPO / "data/arith/test.jsonl"), "shuffle": False}, "limit": 2, "k": 1,
                 "temperature": 0.0, "max_new_tokens": 8, "stop_tokens": ["<|im_end|>"], "at_start": True,
                 "interval": 1}
    runs = []
    for name, algorithm in (("opsd", {"name": "opsd"}), ("sft", {"name": "sft"}),
                            ("grpo", {"name": "grpo", "grpo": {"n": 2}})):
        config = write_config(tmp_path / name, hf_dir, steps=2, prompts_per_step=2, algorithm=algorithm,
                              eval=evaluated, checkpoint={"enabled": False})
        assert main(["train", str(config)]) == 0
        runs.append(tmp_path / name / "run")
    capsys.readouterr()
    out = tmp_path / "cmp" / "all"
    assert main(["compare", *map(str, runs), "--labels", "opsd,sft,grpo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in printed.splitlines() if line.startswith("| ")}
    assert {"opsd", "sft", "grpo"} <= set(rows)
    curves = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    assert [p["step"] for p in curves["opsd"]["points"]] == [0, 1, 2]
    assert curves["sft"]["generated_tokens"] == 0
    assert curves["grpo"]["generated_tokens"] > curves["opsd"]["generated_tokens"] > 0  # 2 rollouts per problem, not 1
    assert [line[:5] for line in out.with_suffix(".md").read_text().splitlines()] == ["| run", "|---|", "| ops", "| sft",
                                                                                      "| grp"]
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
