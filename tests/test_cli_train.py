"""``opsd train`` and ``opsd data preview`` on the command line: errors a user can act on, every key in
``--help``, debug logging."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_opsd.cli import main
from megatron_opsd.data.sources import DataError
from tests.support.train_configs import write_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys, rank):
    """Every command reports a ``UserError`` as one line, exit 2, on rank 0 only (torchrun's ranks
    all meet it); any other exception is a bug and propagates with its traceback."""
    from megatron_opsd import preview

    def fails_with(error: Exception):
        def run(args):
            raise error
        return run

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(preview, "run", fails_with(DataError("data.path: row 3 is empty")))
    assert main(["data", "preview", "any.yaml"]) == 2
    assert capsys.readouterr().err == ("opsd: error: data.path: row 3 is empty\n" if rank == "0" else "")
    monkeypatch.setattr(preview, "run", fails_with(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["data", "preview", "any.yaml"])


def test_cli_keeps_httpx_request_lines_for_debug(tmp_path, hf_dir):
    """A fleet's client logs a line per rollout at httpx's INFO: shown only with --log-level DEBUG."""
    import logging

    httpx_log = logging.getLogger("httpx")
    try:
        assert main(["--log-level", "INFO", "train", str(write_config(tmp_path, hf_dir)), "nokey=1"]) == 2
        assert httpx_log.level == logging.WARNING
        httpx_log.setLevel(logging.NOTSET)
        assert main(["--log-level", "DEBUG", "train", str(write_config(tmp_path, hf_dir)), "nokey=1"]) == 2
        assert httpx_log.level == logging.NOTSET
    finally:
        httpx_log.setLevel(logging.NOTSET)


def test_cli_unknown_key_is_an_error_with_a_suggestion(tmp_path, hf_dir, capsys):
    assert main(["train", str(write_config(tmp_path, hf_dir)), "rollout.sync.intervall=2"]) == 2
    assert "unknown key 'rollout.sync.intervall' (did you mean 'rollout.sync.interval'?)" in capsys.readouterr().err
    assert main(["train", str(write_config(tmp_path, hf_dir)), "rollout.sync_interval=2"]) == 2  # the older layout's key
    assert "config key 'rollout.sync_interval' moved to 'rollout.sync.interval'" in capsys.readouterr().err


def test_cli_bad_data_row_reaches_the_user(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "solution": "2", "answer": "2"}) + "\n"
                   + json.dumps({"problem": "2+2?", "solution": "", "answer": "4"}) + "\n")
    assert main(["train", str(write_config(tmp_path, hf_dir)), f"data.path={bad}"]) == 2
    assert "row 1: field 'solution' (path 'solution') is empty" in capsys.readouterr().err


def test_cli_help_documents_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in ("algorithm.name", "algorithm.opsd.loss.clip", "algorithm.sft.teacher_prompt_fraction", "model.config",
                "rollout.engine.kind", "rollout.engine.path", "rollout.sync.interval", "rollout.sync.probe_tolerance",
                "eval.interval", "eval.data.path", "checkpoint.interval", "tracking.wandb", "optim.lr"):
        assert f"  {key} (" in out or f"  {key}:" in out, key


def test_data_preview_reads_a_training_config(tmp_path, hf_dir, capsys):
    path = write_config(tmp_path, hf_dir)
    assert main(["data", "preview", str(path), "--rows", "1", "--step-samples", "16"]) == 0
    assert f"data: {REPO / 'data/arith/train.jsonl'} [train]: 4000 rows, 4000 usable" in capsys.readouterr().out
    assert main(["data", "preview", str(path), "optim.lrr=1"]) == 2  # validated as a whole training config
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
