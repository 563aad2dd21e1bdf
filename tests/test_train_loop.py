"""``opsd train`` end to end on a tiny model, the shipped tokenizer and arithmetic data (CPU, one process).

- OPSD: a run killed after its step-2 checkpoint and resumed reproduces the uninterrupted run's
  per-step losses exactly; rollouts match the trainer's log-probs; eval, plot, summary are written.
- SFT: the step-1 loss equals a transformers cross-entropy on the same batch; the loss falls.
- A corrupted weight sync stops the run at the probe check, before any step, with a one-line error.
- CLI: unknown keys and bad data rows are exit-2 errors with the key's suggestion / the row index.
- ``opsd eval`` of a training checkpoint evaluates what the run's HF export holds.
- The demo, and the shipped demo config (shortened), run end to end; a rerun with the seed repeats it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_opsd.algorithms.opsd import OPSD, OPSDConfig
from megatron_opsd.algorithms.sft import SFT, SFTConfig
from megatron_opsd.cli import main, parse
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig
from megatron_opsd.data.sources import DataConfig, ProblemIterator, load_problems
from megatron_opsd.fileio import write_manifest
from megatron_opsd.opsd.loss import LossConfig
from megatron_opsd.platform import free_port
from megatron_opsd.rollout.embedded import WeightSyncError
from megatron_opsd.rollout.engine import ProbeMismatchError, Rollout, rollout_samples
from megatron_opsd.rollout.recorded import RecordedRolloutEngine
from megatron_opsd.rollout.sync.inprocess import InProcessSync
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.components import build_components
from megatron_opsd.train.loop import train
from tests.engines import failing_engine, raising
from tests.train_configs import load_train, losses, write_config

REPO = Path(__file__).resolve().parents[1]


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


def _reference_sft_loss(hf_dir: Path, cfg_path: Path) -> float:
    """Mean token cross-entropy of the first step's batch under the transformers model."""
    cfg = yaml.safe_load(cfg_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    builder = PromptBuilder(tokenizer, PromptConfig(**cfg["prompts"]))
    data = DataConfig(**cfg["data"])
    items = ProblemIterator(load_problems(data), data.seed).take(cfg["prompts_per_step"])
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    total, count = 0.0, 0
    for item in items:
        prompt = builder.student_ids(item)
        ids = prompt + tokenizer.encode(item.solution, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1]
        total += float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(ids[len(prompt):]), reduction="sum"))
        count += len(ids) - len(prompt)
    return total / count


def test_sft_cross_entropy_and_learning(tmp_path, hf_dir):
    path = write_config(tmp_path, hf_dir, algorithm={"name": "sft"}, steps=4, optim={"lr": 3e-3, "clip_grad": 1.0},
                        eval={"data": None})
    assert main(["train", str(path)]) == 0
    got = losses(tmp_path / "run")
    assert got[0] == pytest.approx(_reference_sft_loss(hf_dir, path), rel=1e-4)
    assert got[-1] < got[0] - 0.3, got  # lr 3e-3 from a random model: about -0.7 in 3 updates
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert "top1_agreement" not in record and "mismatch/logprob_abs_diff_mean" not in record
    assert not any("teacher" in key for key in record), sorted(record)  # no teacher pass, no teacher update


class AlteredInTransit:
    """The embedded engine, receiving weights that ``alter(name, tensor)`` changed on the way."""

    def __init__(self, engine, alter):
        self.engine, self.alter = engine, alter

    def __getattr__(self, name):  # everything else is the engine's
        return getattr(self.engine, name)

    def update_weights(self, tensors, version, **options):
        self.engine.update_weights((self.alter(name, tensor) for name, tensor in tensors), version, **options)


def altered_sync(alter):
    """``build_components`` with a weight sync whose weights are altered on the way into the engine."""

    def build(cfg):
        c = build_components(cfg)
        probe = c.weight_sync.probe
        return replace(c, weight_sync=InProcessSync(AlteredInTransit(c.engine, alter), c.chunks, probe))

    return build


def test_a_corrupted_weight_sync_stops_the_run(tmp_path, hf_dir):
    path = write_config(tmp_path, hf_dir)
    down = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ProbeMismatchError) as error:
        train(load_train(path), altered_sync(lambda name, t: (name, t + 0.05 if name == down else t)))
    assert re.fullmatch(r"after weight sync 0, .* > rollout.sync.probe_tolerance=0.001: the weights did not "
                        r"arrive intact .*", str(error.value)), error.value
    assert not (tmp_path / "run" / "ckpt").exists()
    # A user error of the commands that run the loop: one clear line, no traceback.
    assert ProbeMismatchError in parse(["train", str(path)]).user_errors
    assert ProbeMismatchError in parse(["demo", str(path)]).user_errors


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


def test_data_preview_reads_a_training_config(tmp_path, hf_dir, capsys):
    path = write_config(tmp_path, hf_dir)
    assert main(["data", "preview", str(path), "--rows", "1", "--step-samples", "16"]) == 0
    assert f"data: {REPO / 'data/arith/train.jsonl'} [train]: 4000 rows, 4000 usable" in capsys.readouterr().out
    assert main(["data", "preview", str(path), "optim.lrr=1"]) == 2  # validated as a whole training config
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_a_weight_stream_the_engine_refuses_stops_the_run(tmp_path, hf_dir):
    rename = altered_sync(lambda name, t: (name.replace("mlp.down_proj", "mlp.down"), t))
    with pytest.raises(WeightSyncError, match="model.layers.0.mlp.down.weight: unknown name"):
        train(load_train(write_config(tmp_path, hf_dir)), rename)


class CountingSync:
    """A weight sync that only counts the versions it is asked to push."""

    def __init__(self):
        self.versions = []

    def push(self, version):
        self.versions.append(version)
        return {}

    def close(self):
        pass


def test_recorded_rollouts_and_a_counting_sync_replace_the_engine_and_the_sync(tmp_path, hf_dir):
    """The engine comes from the factory (rollout.engine.kind=recorded); the sync is replaced as a
    component: the loop pushes before step 1 and every rollout.sync.interval steps, and trains on
    exactly the recorded rollouts."""
    cfg = load_train(write_config(tmp_path, hf_dir, steps=5, eval={"data": None}, checkpoint={"enabled": False}),
                     "rollout.engine.kind=recorded", f"rollout.engine.path={tmp_path / 'rollouts.jsonl'}",
                     "rollout.sync.kind=none", "rollout.sync.interval=2")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(cfg.tokenizer), cfg.prompts)
    RecordedRolloutEngine({tuple(builder.student_ids(p)): [Rollout((5, 6, 7), (-1.0, -2.0, -3.0), "length")]
                           for p in load_problems(cfg.data).problems}).save(tmp_path / "rollouts.jsonl")
    sync = CountingSync()
    train(cfg, lambda cfg: replace(build_components(cfg), weight_sync=sync))
    assert sync.versions == [0, 2, 4]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["response_len_max"] == 3 and r["truncation_rate"] == 1 and r["response_tokens"] == 9 for r in records)
    # The engine's log-probs travel with the samples: the mismatch is against the recorded -1, -2, -3.
    assert all(r["mismatch/logprob_abs_diff_mean"] > 0.5 for r in records)
    assert not any(key.startswith("probe/") for r in records for key in r)


@pytest.mark.parametrize("overrides, shared", [((), True), (("rollout.sync.interval=2",), False),
                                               (("rollout.async=1",), False)])
def test_the_inprocess_engine_holds_the_trainers_weights_only_when_synced_every_step(tmp_path, hf_dir, overrides,
                                                                                      shared):
    """Synced every step without rollouts ahead, the engine's parameters are the trainer's own
    storage (all but the split QKV at TP 1); otherwise each push copies into the engine's own."""
    c = build_components(load_train(write_config(tmp_path, hf_dir, eval={"data": None}, checkpoint={"enabled": False}),
                                    *overrides))
    c.weight_sync.push(1)
    trainer = {p.untyped_storage().data_ptr() for chunk in c.chunks for p in chunk.parameters()}
    engine = {name: p for name, p in c.engine.model.named_parameters()}
    adopted = {name for name, p in engine.items() if p.untyped_storage().data_ptr() in trainer}
    if shared:
        assert {name for name in engine if name not in adopted} == {
            name for name in engine if re.search(r"self_attn\.[qkv]_proj", name)}
    else:
        assert not adopted
    assert c.engine.weight_version == 1


def test_sft_samples_render_the_requested_share_with_the_teacher_prompt():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/tokenizer")
    builder = PromptBuilder(tokenizer, PromptConfig())
    items = list(load_problems(DataConfig(path=str(REPO / "data/arith/test.jsonl"))).problems[:4])
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    sft = SFT(SFTConfig(teacher_prompt_fraction=0.5), builder, end, vocab_size=1000)
    samples = sft.samples(items, None)
    for i, (item, sample) in enumerate(zip(items, samples)):
        prompt = builder.teacher_ids(item) if i < 2 else builder.student_ids(item)
        assert sample.teacher_prompt_ids is None and sample.rollout_logprobs is None
        assert list(sample.student_ids) == prompt + tokenizer.encode(item.solution, add_special_tokens=False) + end
        assert list(sample.prompt_ids) == prompt and sample.group_id == i


def test_opsd_samples_add_the_teacher_side_to_each_rollout():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/tokenizer")
    builder = PromptBuilder(tokenizer, PromptConfig())
    items = list(load_problems(DataConfig(path=str(REPO / "data/arith/test.jsonl"))).problems[:2])
    prompts = [builder.student_ids(p) for p in items]
    rollouts = rollout_samples(prompts, [[Rollout((5, 6), (-0.5, -0.5), "stop", 3)], [Rollout((7,), (-1.0,), "stop", 3)]])
    opsd = OPSD(OPSDConfig(loss=LossConfig(vocab_size=1000)), [torch.nn.Linear(2, 2)], builder, logprob_temperature=1.0)
    samples = opsd.samples(items, rollouts)
    for item, sample, (rollout,) in zip(items, samples, rollouts):
        teacher = builder.teacher_ids(item)
        assert sample.teacher_ids == tuple(teacher) + rollout.response_ids  # the response follows both prompts
        assert sample.student_ids == rollout.student_ids and sample.rollout_logprobs == rollout.rollout_logprobs
        assert "=== Reference Solution Begin ===" in tokenizer.decode(teacher) and sample.weight_version == 3


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
