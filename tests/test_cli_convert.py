"""``opsd convert`` (the three tools behind one command) and ``opsd eval`` on a Megatron checkpoint.

Megatron's CPU adaptation changes process-wide torch state, so the commands run in one separate
process (see :func:`drive`), in order, and each test checks what its command returned and wrote.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_cli_eval import FAST, REPO, TEST_DATA, save_tiny_chat_model


def drive(plan_file: str) -> None:
    """Subprocess side: run each command of the plan through ``opsd``'s main; record exit code and output."""
    from megatron_opsd.cli import main

    plan = json.loads(Path(plan_file).read_text())
    results = {}
    for name, argv in plan.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
        results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
    Path(plan_file).with_suffix(".results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("convert")
    hf, meg = str(save_tiny_chat_model(work / "hf")), str(work / "megatron")
    (work / "existing").mkdir()
    plan = {
        "to_megatron": ["convert", "hf-to-megatron", "--hf-dir", hf, "--out", meg],
        "verify": ["convert", "verify", "--hf-dir", hf, "--megatron-dir", meg],
        "verify_fail": ["convert", "verify", "--hf-dir", hf, "--megatron-dir", meg, "--tol", "-1"],
        "to_hf": ["convert", "megatron-to-hf", "--megatron-dir", meg, "--out", str(work / "back")],
        "missing_input": ["convert", "hf-to-megatron", "--hf-dir", str(work / "nope"), "--out", str(work / "x")],
        "existing_output": ["convert", "megatron-to-hf", "--megatron-dir", meg, "--out", str(work / "existing")],
        "help": ["convert", "verify", "--help"],
        "eval_megatron": ["eval", meg, "--data", TEST_DATA, "--out", str(work / "megatron.json"), *FAST],
        "eval_hf": ["eval", hf, "--data", TEST_DATA, "--out", str(work / "hf.json"), *FAST],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = f"from tests.test_cli_convert import drive; drive({str(work / 'plan.json')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return work


@pytest.fixture(scope="module")
def results(work) -> dict[str, dict]:
    return json.loads((work / "plan.results.json").read_text())


def test_hf_to_megatron_and_verify(results):
    assert results["to_megatron"]["code"] == 0, results["to_megatron"]["err"][-3000:]
    assert results["verify"]["code"] == 0 and "tp=1 pp=1" in results["verify"]["out"] and "-> OK" in results["verify"]["out"]


def test_verify_exit_code_reaches_the_shell(results):
    assert results["verify_fail"]["code"] == 1 and "-> FAIL" in results["verify_fail"]["out"]


def test_round_trip_is_bitwise(work, results):
    assert results["to_hf"]["code"] == 0, results["to_hf"]["err"][-3000:]
    before, after = load_file(work / "hf" / "model.safetensors"), {}
    for f in (work / "back").glob("*.safetensors"):
        after.update(load_file(f))
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert (work / "back" / "tokenizer.json").read_bytes() == (work / "hf" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("case, message", [("missing_input", "no config.json in"), ("existing_output", "already exists")])
def test_bad_input_is_one_line_exit_2(results, case, message):
    assert results[case]["code"] == 2
    line = results[case]["err"].strip().splitlines()[-1]
    assert line.startswith("opsd: error: ") and message in line


def test_help_is_the_tools_own(results):
    assert results["help"]["code"] == 0 and "--megatron-dir" in results["help"]["out"] and "--tol" in results["help"]["out"]


def test_eval_of_the_megatron_checkpoint_equals_the_hf_model(work, results):
    """Same seed, same weights through the bridge: the same sampled responses, token for token."""
    assert results["eval_megatron"]["code"] == 0, results["eval_megatron"]["err"][-3000:]
    megatron, hf = (json.loads((work / f"{n}.json").read_text()) for n in ("megatron", "hf"))
    assert megatron["problems"] == hf["problems"] and megatron["metrics"] == hf["metrics"]
    assert megatron["model"] == str(work / "megatron")
