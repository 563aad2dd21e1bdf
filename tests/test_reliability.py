"""What a user meets when something goes wrong: another run's checkpoints, damaged files, kills and
preemption, reruns, bad input. Each test names the item of the reliability issue it covers."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_opsd.cli import main
from megatron_opsd.config import parse_override
from megatron_opsd.fileio import CheckpointError, verify_manifest
from megatron_opsd.platform import free_port
from megatron_opsd.tracking import read_metrics
from tests.support.tiny_models import save_tiny_model
from tests.support.train_configs import REPO, losses, write_config

SMALL = {"steps": 2, "prompts_per_step": 2, "eval": {"data": None}}
pytestmark = pytest.mark.usefixtures("one_thread")


def small(tmp_path: Path, hf_dir: Path, **top) -> Path:
    """Two steps, checkpoints under run_dir (the default place), no eval."""
    return write_config(tmp_path, hf_dir, **{**SMALL, "checkpoint": {"interval": 1, "keep_last": 2}, **top})


def error_of(capsys, *argv: str) -> str:
    """The message ``opsd`` prints, once, for a user error (exit code 2): ``opsd: error:`` and, for
    an invalid config, one indented line per problem. No traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("opsd: error:")]
    assert len(first) == 1 and "Traceback" not in err, err
    rest = [line for line in lines[first[0] + 1:] if line.startswith("  ")]
    return "\n".join([lines[first[0]], *rest])


# ---------------------------------------------------------------- 1. checkpoints belong to their run
def test_a_run_resumes_only_its_own_checkpoints_and_loading_another_is_a_warm_start(tmp_path, hf_dir, capsys, caplog):
    first = small(tmp_path / "a", hf_dir)
    assert main(["train", str(first)]) == 0
    assert (tmp_path / "a" / "run" / "checkpoints" / "latest").is_file()  # checkpoints live in the run's directory
    other = small(tmp_path / "b", hf_dir, seed=9, optim={"lr": 2e-3, "clip_grad": 1.0})
    assert main(["train", str(other)]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")] == [1, 2]  # its own two steps
    # The same run directory with another seed and lr: refused, naming the keys that differ.
    line = error_of(capsys, "train", str(first), "steps=3", "seed=9", "optim.lr=2e-3")
    assert "was written by a run with another config (optim.lr: 0.001 -> 0.002; seed: 3 -> 9)" in line, line
    # Keys that may change on resume do not count: a longer run that reports otherwise continues.
    assert main(["train", str(first), "steps=3", "tracking.progress=true"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")] == [1, 2, 3]
    # An explicit load of another run: a warm start from its weights, logged as one.
    warm = small(tmp_path / "c", hf_dir, seed=9)
    with caplog.at_level("WARNING"):
        assert main(["train", str(warm), f"checkpoint.load={tmp_path / 'a' / 'run' / 'checkpoints'}"]) == 0
    assert "warm start from" in caplog.text and "step_000003" in caplog.text and "seed: 3 -> 9" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "c" / "run" / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------- 2. damaged contents are detected
def test_damaged_checkpoint_contents_are_detected_at_random_offsets(tmp_path, hf_dir):
    assert main(["train", str(small(tmp_path, hf_dir))]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    verify_manifest(step)
    files = [f for f in step.rglob("*") if f.is_file() and f.name != "manifest.json" and f.stat().st_size]
    rng = random.Random(0)
    for trial in range(25):
        copy = tmp_path / f"damaged_{trial}"
        shutil.copytree(step, copy)
        victim = copy / rng.choice(files).relative_to(step)
        data = bytearray(victim.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= rng.randrange(1, 256)  # same size, other contents
        victim.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{victim.relative_to(copy)} does not match its checksum"):
            verify_manifest(copy)
        shutil.rmtree(copy)


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, hf_dir, capsys, caplog):
    path = small(tmp_path, hf_dir)
    assert main(["train", str(path)]) == 0
    root = tmp_path / "run" / "checkpoints"
    weights = min((root / "step_000002").glob("*.distcp"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(data)
    with caplog.at_level("WARNING"):
        assert main(["train", str(path), "steps=3"]) == 0
    assert f"resuming from {root / 'step_000001'} instead" in caplog.text and "step_000002 is damaged" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]  # step 2 trained again
    for step in root.glob("step_*"):  # none intact: one line, nothing trained
        (step / "common.pt").write_bytes(b"\0" * (step / "common.pt").stat().st_size)
    assert "no intact checkpoint under" in error_of(capsys, "train", str(path), "steps=4")


# ---------------------------------------------------------------- 3. no process outlives its job
def _group(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group."""
    alive = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                alive.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:80]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """``opsd ARGV`` as a user starts it, in a process group of its own, its output into ``log``."""
    with open(log, "w") as out:  # a file, not a pipe: a pipe nobody reads would stall a chatty run
        return subprocess.Popen([sys.executable, "-m", "megatron_opsd.cli", *argv], cwd=REPO, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def _gone(pgid: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _group(pgid)


def test_sigkill_leaves_no_process_of_the_run(tmp_path, hf_dir):
    path, log = small(tmp_path, hf_dir, steps=200), tmp_path / "log"
    proc = _start(["train", str(path)], log)
    _wait_for(tmp_path / "run" / "checkpoints" / "latest", proc, log)
    assert len(_group(proc.pid)) >= 2  # the trainer and the fork Manager of its checkpoint writers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(proc.pid) == []


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path, hf_dir):
    steps = {"steps": 8, "checkpoint": {"interval": 4, "keep_last": 2}}
    assert main(["train", str(small(tmp_path / "whole", hf_dir, **steps))]) == 0
    path, log = small(tmp_path / "stopped", hf_dir, **steps), tmp_path / "log"
    proc = _start(["train", str(path)], log)
    _wait_for(tmp_path / "stopped" / "run" / "metrics.jsonl", proc, log)  # step 1 is logged
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=180)
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped_at = len(losses(tmp_path / "stopped" / "run"))
    assert 1 <= stopped_at < 8
    latest = (tmp_path / "stopped" / "run" / "checkpoints" / "latest").read_text()
    assert latest == f"step_{stopped_at:06d}" and f"stopped by SIGTERM after step {stopped_at}" in err
    assert _gone(proc.pid) == []
    assert main(["train", str(path)]) == 0
    assert losses(tmp_path / "stopped" / "run") == losses(tmp_path / "whole" / "run")


@pytest.mark.parametrize("signals", ["one", "relayed", "second"])
def test_a_stop_request_without_a_step_boundary_ends_the_process_after_the_grace_period(signals):
    """The main thread waits in native code (as in a collective whose peer died): no Python handler
    runs there, yet the process ends, after the grace period or at a second request. The same signal
    twice within StopRequests.RELAY_S (SLURM's and torchrun's copies of one) is one request."""
    code = ("import time\nfrom megatron_opsd.processes import StopRequests\nStopRequests.RELAY_S = 1.0\n"
            "with StopRequests(grace_s=4):\n    print('ready', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    if signals != "one":
        time.sleep({"relayed": 0.05, "second": 1.5}[signals])
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    if signals == "second":
        assert "a second stop request" in err and time.monotonic() - start < 3.5
    else:
        assert "no step boundary within 4 s" in err and time.monotonic() - start >= 3.5


def test_ctrl_c_stops_at_a_step_boundary_and_leaves_no_process(tmp_path, hf_dir):
    path, log = small(tmp_path, hf_dir, steps=200), tmp_path / "log"
    proc = _start(["train", str(path)], log)
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc, log)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    assert proc.returncode == 128 + signal.SIGINT and "stopped by SIGINT after step" in log.read_text()
    assert _gone(proc.pid) == []


def test_a_killed_conversion_leaves_no_process_and_no_output(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")  # 130M parameters
    out, log = tmp_path / "megatron", tmp_path / "log"
    proc = _start(["convert", "hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--out", str(out)], log)
    deadline = time.monotonic() + 180
    while len(_group(proc.pid)) < 3:  # the converter, the fork Manager and a checkpoint writer: mid-save
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(proc.pid) == [] and not out.exists()


# ---------------------------------------------------------------- 4. a no-op rerun keeps the results
def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_results(tmp_path, hf_dir, capsys):
    path = small(tmp_path, hf_dir)
    assert main(["train", str(path)]) == 0
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    assert "has finished its 2 steps: nothing to train, its results are left as they are" in capsys.readouterr().out
    assert "past steps=1: nothing to train" in error_of(capsys, "train", str(path), "steps=1")
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files


# ---------------------------------------------------------------- 5. over-long prompts when loading
def test_an_over_long_problem_is_found_when_the_data_is_loaded(tmp_path, hf_dir, capsys, caplog):
    rows = (REPO / "data" / "arith" / "train.jsonl").read_text().splitlines()[:60]
    long = json.loads(rows[40])
    long["problem"] = " ".join([long["problem"]] * 40)
    rows[40] = json.dumps(long)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    path = small(tmp_path, hf_dir, data={"path": str(data)})
    line = error_of(capsys, "train", str(path))
    assert f"1 row(s) of {data} [train] have prompts over their limits" in line
    assert not (tmp_path / "run").exists()  # before anything was built or trained
    err = capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(["train", str(path), "data.on_invalid_row=skip"]) == 0, err
    assert "skipped 1 row(s) whose prompts exceed their limits (first: row 40: student prompt has" in caplog.text


# ---------------------------------------------------------------- 6. bad input is one clear line
def test_bad_data_files_are_one_line_naming_file_and_line(tmp_path, hf_dir, capsys):
    good = json.dumps({"problem": "1 + 1?", "solution": "2", "answer": "2"})
    cases = {"malformed.jsonl": good + '\n{"problem": "2 + 2?", "solution": 4 "answer": "4"}\n', "empty.jsonl": "",
             "blank.jsonl": "\n\n", "list.jsonl": good + "\n[1, 2]\n"}
    expected = {"malformed.jsonl": "malformed.jsonl line 2 is not valid JSON", "empty.jsonl": "empty file, no rows",
                "blank.jsonl": "no rows (only blank lines)", "list.jsonl": "list.jsonl line 2 is a JSON list, not an object"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        path = small(tmp_path, hf_dir, data={"path": str(tmp_path / name)})
        assert expected[name] in error_of(capsys, "train", str(path))


def test_bad_tokenizer_and_model_directories_are_one_line(tmp_path, hf_dir, capsys):
    path = small(tmp_path, hf_dir)
    assert "tokenizer /nonexistent/tok: no such directory" in error_of(capsys, "train", str(path), "tokenizer=/nonexistent/tok")
    assert "model.hf=/nonexistent/m: no config.json there" in error_of(capsys, "train", str(path), "model.hf=/nonexistent/m")
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "config.json").write_text("{not json")
    line = error_of(capsys, "train", str(path), f"model.hf={broken}")
    assert f"{broken / 'config.json'} is not readable JSON" in line and "vocab_size" not in line
    shard = min(broken.glob("*.safetensors"))
    shutil.copy(hf_dir / "config.json", broken / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "data" / "tokenizer" / name, broken / name)
    os.truncate(shard, shard.stat().st_size - 100)
    line = error_of(capsys, "eval", str(broken), "--data", str(REPO / "data/arith/test.jsonl"), "--k", "1", "limit=1")
    assert str(shard) in line and "incomplete metadata" in line
    assert str(shard) in error_of(capsys, "train", str(path), f"model.hf={broken}")


def test_resuming_with_another_model_shape_is_one_line(tmp_path, hf_dir, capsys):
    path = small(tmp_path, hf_dir)
    assert main(["train", str(path)]) == 0
    other = save_tiny_model("qwen3_untied", tmp_path / "untied")  # an lm_head more: another checkpoint layout
    line = error_of(capsys, "train", str(path), "steps=3", f"model.hf={other}")
    assert "cannot load (was it written for another model?)" in line


def test_a_layout_error_is_printed_once_not_once_per_rank(tmp_path, hf_dir):
    path = small(tmp_path, hf_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_opsd.cli", "train", str(path), "parallel.tp=3"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "opsd: error:" in line]
    assert len(lines) == 1 and "world size 2 is not divisible by tp*pp*cp = 3" in lines[0], proc.stderr[-3000:]


# ---------------------------------------------------------------- 7. messages name the real problem
def test_messages_name_the_real_problem(tmp_path, hf_dir, capsys):
    path = small(tmp_path, hf_dir)
    assert main(["train", str(path)]) == 0
    root = tmp_path / "run" / "checkpoints"
    load = small(tmp_path / "other", hf_dir)
    pruned = root / "step_000000"
    assert f"{pruned} does not exist (pruned by checkpoint.keep_last" in error_of(
        capsys, "train", str(load), f"checkpoint.load={pruned}")
    (root / "latest").write_text("")
    assert f"{root / 'latest'} is empty" in error_of(capsys, "train", str(path), "steps=3")
    # The sync-interval rule concerns checkpoints only; without them any interval is fine.
    unsynced = small(tmp_path / "nock", hf_dir, checkpoint={"enabled": False, "interval": 3})
    assert main(["train", str(unsynced), "rollout.sync.interval=2"]) == 0
    assert parse_override("prompts.student_template={problem}") == (["prompts", "student_template"], "{problem}")


# ---------------------------------------------------------------- 8. ungradable gold answers are counted
def test_gold_answers_math_verify_cannot_parse_are_counted_and_shown(tmp_path, capsys, caplog):
    from tests.test_cli_eval import save_tiny_chat_model

    rows = [{"problem": "What is 1/2?", "solution": "s", "answer": "\\frac{1}{2"},
            {"problem": "What is 2 + 2?", "solution": "s", "answer": "4"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_tiny_chat_model(tmp_path / "hf")
    with caplog.at_level("WARNING"):
        assert main(["eval", str(model), "--data", str(data), "--k", "1", "eval.max_new_tokens=4",
                     "--out", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["unparseable_references"] == [0]
    assert "1 gold answer(s) math-verify cannot parse" in caplog.text
    preview = tmp_path / "preview.yaml"
    preview.write_text(f"tokenizer: {REPO / 'data' / 'tokenizer'}\ndata: {{path: {data}}}\n")
    assert main(["data", "preview", str(preview), "--rows", "0"]) == 0
    assert "gold answers math-verify cannot parse (graded as text only): 1, rows [0]" in capsys.readouterr().out


# ---------------------------------------------------------------- 9. a killed demo resumes
def test_a_killed_demo_resumes_and_prints_what_an_unbroken_one_prints(tmp_path, hf_dir):
    path = write_config(tmp_path, hf_dir, steps=3, checkpoint={"interval": 1},  # warm-up samples have teacher prompts
                        packing={"tokens_per_micro_batch": 512, "teacher_tokens_per_micro_batch": 512})
    demo = [sys.executable, "-m", "megatron_opsd.cli", "demo", str(path), "--warmup-steps", "2",
            "--warmup-prompts-per-step", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*demo, f"run_dir={tmp_path / 'whole'}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = tmp_path / "log"
    killed = _start([*demo[3:], f"run_dir={tmp_path / 'killed'}"], log)
    _wait_for(tmp_path / "killed" / "opsd" / "checkpoints" / "latest", killed, log)  # in the middle of the OPSD phase
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert _gone(killed.pid) == []
    again = subprocess.run([*demo, f"run_dir={tmp_path / 'killed'}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    line = again.stdout.strip().splitlines()[-1]
    assert "resuming the demo" in again.stdout and line.split(" in ")[0] == whole.stdout.strip().splitlines()[-1].split(" in ")[0]
