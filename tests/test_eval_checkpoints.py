"""``opsd eval`` of a training run's checkpoints: what the run's HF export holds; a checkpoint of the older
layout is refused by name, its weights still evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_opsd.cli import main
from megatron_opsd.fileio import write_manifest
from tests.support.train_configs import write_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_reads_a_training_checkpoint(tmp_path, hf_dir, capsys):
    """``opsd eval`` of a step directory (model weights only, via its hf/) gives the report of the
    run's HF export of the same weights; a damaged step is a one-line error naming what is missing."""
    path = write_config(tmp_path, hf_dir, algorithm={"name": "sft"}, steps=1, export_hf=True, eval={"data": None})
    assert main(["train", str(path)]) == 0
    run, step = tmp_path / "run", tmp_path / "run" / "ckpt" / "step_000001"
    assert (step / "hf" / "config.json").is_file() and (step / "hf" / "tokenizer.json").is_file()
    fast = ["--data", str(REPO / "data/arith/test.jsonl"), "--k", "2", "limit=3", "eval.max_new_tokens=8"]
    assert main(["eval", str(step), *fast, "--out", str(tmp_path / "step.json")]) == 0
    assert main(["eval", str(run / "hf"), *fast, "--out", str(tmp_path / "hf.json")]) == 0
    from_step, from_hf = (json.loads((tmp_path / name).read_text()) for name in ("step.json", "hf.json"))
    assert from_step.pop("model") == str(step.resolve()) and from_hf.pop("model") == str((run / "hf").resolve())
    assert from_step["num_problems"] == 3 and from_step["k"] == 2 and set(from_step["metrics"]) == {
        "avg@2", "pass@1", "pass@2", "maj@2"}
    assert from_step == from_hf

    (step / "hf" / "config.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(step), *fast]) == 2
    assert f"cannot load Megatron checkpoint {step}: {step} is damaged: hf/config.json is missing" in capsys.readouterr().err


def test_a_checkpoint_of_the_older_layout_is_refused_by_name_and_its_weights_still_evaluate(tmp_path, hf_dir, capsys):
    """Resuming from a checkpoint written before the checkpoint held named parts (format 1: model0 /
    optimizer / teacher / rng tensors and a 'common' entry) is a one-line error naming the missing
    entry; its model weights still load for evaluation."""
    path = write_config(tmp_path, hf_dir, steps=1, eval={"data": None})
    assert main(["train", str(path)]) == 0
    step = tmp_path / "run" / "ckpt" / "step_000001"
    common = torch.load(step / "common.pt", weights_only=False)
    old = {"common": {"step": 1, "trainer": {"data": common["data"], "step": common["runner"]},
                      "scheduler": common["scheduler"], "layout": common["checkpoint"]["layout"], "teacher_mode": "fixed"}}
    torch.save(old, step / "common.pt")
    (step / "manifest.json").unlink()
    write_manifest(step)
    assert main(["train", str(path), "steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"opsd: error: {step} was written by an older layout of megatron-opsd (format 1, this code reads 2): its " \
           "common state has no 'checkpoint' entry of format 2 (it has ['common'])" in err and "Traceback" not in err
    fast = ["--data", str(REPO / "data/arith/test.jsonl"), "--k", "1", "limit=2", "eval.max_new_tokens=4"]
    assert main(["eval", str(step), *fast, "--out", str(tmp_path / "old.json")]) == 0
