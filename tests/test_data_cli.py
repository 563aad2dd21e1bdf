"""``opsd data preview``: renders the shipped data; fails with clear validation errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_opsd.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "examples" / "data_preview.yaml")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the example config's paths are relative to the repo root


def test_preview_renders_prompts_counts_and_packing(capsys):
    assert main(["data", "preview", CONFIG, "--rows", "2", "data.path=data/arith/test.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "data: data/arith/test.jsonl [train]: 500 rows, 500 usable, 0 skipped" in out
    assert out.count("----- student prompt: ") == 2 and out.count("----- teacher prompt: ") == 2
    assert "=== Reference Solution Begin ===" in out and "<think>\n\n</think>" in out
    assert "teacher solutions trimmed: 0" in out and "micro-batches, filled to" in out


def _write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preview_fails_with_the_validation_error(tmp_path, capsys):
    rows = [{"problem": "p", "solution": "s", "answer": "1"}, {"problem": "p", "solution": "", "answer": "1"}]
    path = _write(tmp_path, rows)
    assert main(["data", "preview", CONFIG, f"data.path={path}"]) == 2
    err = capsys.readouterr().err
    assert f"opsd: error: 1 invalid field(s) in {path} [train]" in err and "row 1: field 'solution' (path 'solution') is empty" in err
    assert main(["data", "preview", CONFIG, f"data.path={path}", "data.on_invalid_row=skip", "--rows", "1"]) == 0
    assert "2 rows, 1 usable, 1 skipped" in capsys.readouterr().out


def test_preview_fails_on_a_misnamed_solution_field(tmp_path, capsys):
    path = _write(tmp_path, [{"problem": "p", "reference": "s", "answer": "1"}])
    assert main(["data", "preview", CONFIG, f"data.path={path}", "data.on_invalid_row=skip"]) == 2
    assert "no row has field 'solution' at path 'solution'; columns are ['answer', 'problem', 'reference']" in capsys.readouterr().err


def test_preview_rejects_unknown_config_keys(capsys):
    assert main(["data", "preview", CONFIG, "data.feilds.problem=q"]) == 2
    assert "unknown key 'data.feilds'" in capsys.readouterr().err


def test_preview_reports_a_sample_over_the_packing_budget(capsys):
    assert main(["data", "preview", CONFIG, "data.path=data/arith/test.jsonl", "packing.tokens_per_micro_batch=64"]) == 2
    assert "exceeds the micro-batch budget (64 / 4096); raise packing.tokens_per_micro_batch" in capsys.readouterr().err
