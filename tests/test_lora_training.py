"""LoRA in training, on the tiny model in one process: only the adapters train, the fixed teacher is
the base with the adapters off (no copy of any weight), every weight sync carries the merged,
changed weights, checkpoints hold the adapters only, and a killed run resumes exactly."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model
from safetensors.torch import load_file

from megatron_opsd.cli import main
from megatron_opsd.models import build_model, checkpoint
from megatron_opsd.models.bridge import model_hf_tensors
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.train.components import build_components
from megatron_opsd.train.loop import train
from tests.support.train_configs import REPO, load_train, losses, write_config

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = {"r": 4, "alpha": 8.0}
Q0 = "model.layers.0.self_attn.q_proj.weight"


def lora_run(tmp_path: Path, hf_dir: Path, **top) -> Path:
    return write_config(tmp_path, hf_dir, **{"steps": 3, "prompts_per_step": 2, "eval": {"data": None},
                                             "model": {"hf": str(hf_dir), "lora": LORA}, **top})


def test_lora_opsd_trains_the_adapters_only_and_every_sync_carries_them(tmp_path, hf_dir):
    synced, parts = [], {}

    def build(cfg):
        components = build_components(cfg)
        parts["components"] = components
        load = components.engine.update_weights

        def recording(tensors, version, **kwargs):
            tensors = list(tensors)
            synced.append((version, next(t for n, t in tensors if n == Q0).clone()))
            return load(iter(tensors), version, **kwargs)

        components.engine.update_weights = recording
        return components

    summary = train(load_train(lora_run(tmp_path, hf_dir)), build)
    components = parts["components"]
    named = [(n, p) for c in components.chunks for n, p in unwrap_model(c).named_parameters()]
    trained = [n for n, p in named if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert sum(p.numel() for n, p in named if p.requires_grad) < 0.2 * sum(p.numel() for _, p in named)
    assert components.algorithm.teacher.weights is None  # the fixed teacher: adapters off, nothing copied
    assert [v for v, _ in synced] == [0, 1, 2, 3]
    for (_, before), (version, after) in itertools.pairwise(synced):
        assert not torch.equal(before, after), f"sync {version} carried the same q_proj as the one before"
    assert summary["metrics"]["probe/logprob_abs_diff_max"] < 1e-3  # the engine computes the adapted model


def test_a_lora_checkpoint_holds_the_adapters_only_and_a_killed_run_resumes_exactly(tmp_path, hf_dir):
    steps = {"steps": 4, "checkpoint": {"interval": 1, "keep_last": 2}}
    assert main(["train", str(lora_run(tmp_path / "whole", hf_dir, **steps, export_hf=True))]) == 0
    full = tmp_path / "full"
    assert main(["train", str(write_config(full, hf_dir, steps=1, prompts_per_step=2, eval={"data": None},
                                           checkpoint={"interval": 1, "keep_last": 1}))]) == 0
    lora_ckpt = tmp_path / "whole" / "run" / "checkpoints" / "step_000004"
    assert _tensor_bytes(lora_ckpt) < 0.2 * _tensor_bytes(full / "run" / "checkpoints" / "step_000001")

    path, log = lora_run(tmp_path / "killed", hf_dir, **steps), tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_opsd.cli", "train", str(path)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "killed" / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text() >= "step_000002"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(["train", str(path)]) == 0
    assert losses(tmp_path / "killed" / "run") == losses(tmp_path / "whole" / "run")
    # The adapters-only checkpoint loads on its own (the base named in its lora.json): the run's merged export.
    groups = initialize(Layout())
    try:
        chunks = build_model(lora_ckpt / "hf", groups=groups)
        checkpoint.load(chunks, lora_ckpt)
        exported = dict(model_hf_tensors(chunks))
    finally:
        ps.destroy_model_parallel()
    merged = {k: v for f in (tmp_path / "whole" / "run" / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert exported.keys() == merged.keys() and all(torch.equal(exported[k], merged[k]) for k in merged)
    adapter = load_file(tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # trained B, PEFT's names


def _tensor_bytes(checkpoint: Path) -> int:
    """Bytes of a dist checkpoint's tensor files."""
    return sum(p.stat().st_size for p in checkpoint.glob("*.distcp"))


def test_adapters_start_from_a_peft_directory_and_an_ema_teacher_averages_the_adapters_only(tmp_path, hf_dir):
    assert main(["train", str(lora_run(tmp_path / "first", hf_dir, steps=1, export_hf=True))]) == 0
    adapter_dir = tmp_path / "first" / "run" / "adapter"
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    seen = {}

    def build(cfg):
        components = build_components(cfg)
        seen["adapters"] = {n: p.detach().clone() for c in components.chunks
                            for n, p in unwrap_model(c).named_parameters() if p.requires_grad}
        seen["teacher"] = components.algorithm.teacher
        return components

    model = {"hf": str(hf_dir), "lora": {**LORA, "init_from": str(adapter_dir)}}
    cfg = load_train(lora_run(tmp_path / "second", hf_dir, steps=1, model=model), "algorithm.opsd.teacher.mode=ema")
    train(cfg, build)
    b0 = next(v for k, v in seen["adapters"].items() if k.endswith("layers.0.self_attention.lora_qkv.q_B"))
    assert torch.equal(b0, saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    teacher = seen["teacher"]
    assert len(teacher.weights) == len(seen["adapters"])  # a copy of each adapter, none of the base
