"""The three conversion tools end to end on a fresh tiny model at TP=2 (subprocesses)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from megatron_opsd.platform import free_port
from tests.support.distributed import REPO
from tests.support.tiny_models import save_tiny_model


def run(args, nproc=1, expect=0):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("tools")
    hf = save_tiny_model("llama", work / "hf")
    run(["tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(work / "megatron"), "--tp", "2"], nproc=2)
    return hf, work / "megatron"


def test_megatron_to_hf_is_bitwise(converted, tmp_path):
    hf, megatron = converted
    out = tmp_path / "back"
    run(
        [
            "tools/convert_megatron_to_hf.py",
            "--megatron-dir",
            str(megatron),
            "--out",
            str(out),
            "--tp",
            "2",
            "--hf-config",
            str(hf),
        ],
        nproc=2,
    )
    merged = [{}, {}]
    for i, d in enumerate((hf, out)):
        for f in d.glob("*.safetensors"):
            merged[i].update(load_file(f))
    assert merged[0].keys() == merged[1].keys()
    assert all(merged[0][k].equal(merged[1][k]) for k in merged[0])
    assert (hf / "config.json").read_text() == (out / "config.json").read_text()
    assert (out / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_verify_passes_at_tp2(converted):
    hf, megatron = converted
    out = run(
        ["tools/verify_conversion.py", "--hf-dir", str(hf), "--megatron-dir", str(megatron), "--tp", "2"], nproc=2
    )
    assert "tp=2 pp=1" in out and "-> OK" in out


def test_verify_fails_above_tolerance(converted, tmp_path):
    hf, megatron = converted  # against an HF copy with one weight moved: the checkpoint no longer matches it
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in hf.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    shard = load_file(hf / index[name])
    shard[name] = shard[name] + 0.05
    save_file(shard, moved / index[name], metadata={"format": "pt"})
    out = run(["tools/verify_conversion.py", "--hf-dir", str(moved), "--megatron-dir", str(megatron)], expect=1)
    assert "-> FAIL" in out


def test_bad_input_is_reported_by_the_tool(converted, tmp_path):
    hf, _ = converted
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    lost = index["model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf.iterdir():
        if f.name != lost:
            (broken / f.name).write_bytes(f.read_bytes())
    out = run(["tools/convert_hf_to_megatron.py", "--hf-dir", str(broken), "--out", str(tmp_path / "m")], expect=1)
    assert f"missing shard file {broken / lost}" in out
    assert not (tmp_path / "m").exists()
