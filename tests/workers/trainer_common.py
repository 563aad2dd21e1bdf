"""What the trainer workers share: one run's config (a tiny model on a few shipped arithmetic
problems, with recorded rollouts), built into components by the product's own factory, and full
(TP-gathered, HF-named) gradients for comparisons. No loop and no checkpoint keys of its own: the
workers run the product's ``Trainer`` and its checkpoints."""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core.utils import unwrap_model
from transformers import AutoTokenizer

from megatron_opsd.config import load_config
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig
from megatron_opsd.data.sources import DataConfig, load_problems
from megatron_opsd.models.bridge import model_hf_tensors
from megatron_opsd.rollout.engine import Rollout
from megatron_opsd.rollout.recorded import RecordedRolloutEngine
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.components import Components
from megatron_opsd.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
PROMPTS = {"template": "custom", "student_template": "{problem}", "eval_template": "{problem}",
           "teacher_template": "{problem}\n\nReference solution:\n{solution}"}

# The resume scenario: DP=2 with the distributed optimizer, an EMA teacher and a warmup + cosine
# schedule, so that every piece of state (optimizer moments and step, teacher, scheduler, data
# position) has to come back for the losses to match.
RESUME = ("algorithm.opsd.teacher.mode=ema", "optim.schedule=cosine", "optim.warmup_steps=2",
          "optim.distributed_optimizer=true")


def args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--work", required=True)
    return parser.parse_known_args()[0]


def write_inputs(work: Path, hf_dir: Path, problems: int = 24) -> None:
    """The workers' data file, recorded rollouts (4-12 random tokens per problem) and base config."""
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    rows = (REPO / "data" / "arith" / "train.jsonl").read_text().splitlines()[:problems]
    (work / "problems.jsonl").write_text("\n".join(rows) + "\n")
    builder = PromptBuilder(tokenizer, PromptConfig(**PROMPTS))
    records = {}
    for problem in load_problems(DataConfig(path=str(work / "problems.jsonl"))).problems:
        g = torch.Generator().manual_seed(20_000 + problem.index)
        response = torch.randint(10, len(tokenizer), (4 + problem.index % 9,), generator=g).tolist()
        records[tuple(builder.student_ids(problem))] = [Rollout(tuple(response), (-1.0,) * len(response), "stop")]
    RecordedRolloutEngine(records).save(work / "rollouts.jsonl")
    config = {
        "run_dir": str(work / "run"), "seed": 3, "steps": 6, "prompts_per_step": 6,
        "tokenizer": str(REPO / "data" / "tokenizer"), "model": {"hf": str(hf_dir)},
        "data": {"path": str(work / "problems.jsonl"), "seed": 7}, "prompts": PROMPTS,
        "packing": {"tokens_per_micro_batch": 128, "teacher_tokens_per_micro_batch": 256},
        "algorithm": {"opsd": {"teacher": {"ema_decay": 0.9}}},
        "rollout": {"max_new_tokens": 10, "stop_tokens": ["<|im_end|>"],
                    "engine": {"kind": "recorded", "path": str(work / "rollouts.jsonl")}, "sync": {"kind": "none"}},
        "optim": {"lr": 3e-3, "clip_grad": 1.0},
        # The checks that resume turn checkpoints on; a rank whose peer was killed stops soon after torchrun's SIGTERM.
        "checkpoint": {"enabled": False, "stop_grace_s": 10},
        "tracking": {"wandb": False, "progress": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))


def config(*overrides: str) -> TrainConfig:
    """The workers' base config with dotted ``key=value`` overrides."""
    return load_config(TrainConfig, Path(args().work) / "config.yaml", list(overrides))


def work_path(name: str) -> Path:
    return Path(args().work) / name


def losses(run_dir: Path) -> list[float]:
    """The per-step losses of a run, once rank 0 has logged them all."""
    dist.barrier()
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def save_json(name: str, value) -> None:
    if dist.get_rank() == 0:
        work_path(name).write_text(json.dumps(value))


@contextmanager
def _params_hold(model, tensors):
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, t in zip(model.parameters(), tensors):
            p.copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)


def full_grads(c: Components) -> dict[str, torch.Tensor]:
    """Finalized gradients (after the student pass) as full HF-named tensors, on global rank 0."""
    model = unwrap_model(c.chunks[0])
    with _params_hold(model, [p.main_grad for p in model.parameters()]):
        return {name: t.clone() for name, t in model_hf_tensors([model])}


def full_params(c: Components) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model_hf_tensors([unwrap_model(c.chunks[0])])}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, what: str) -> None:
    """On global rank 0, where the exported tensors are (elsewhere both are empty)."""
    if dist.get_rank() != 0:
        assert not got, f"{what}: rank {dist.get_rank()} received exported tensors"
        return
    assert got.keys() == want.keys(), f"{what}: names differ: {sorted(got.keys() ^ want.keys())}"
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    scale = max(t.abs().max().item() for t in want.values())
    assert scale > 0, f"{what}: reference is all zeros"
    assert worst <= atol, f"{what}: max abs difference {worst:.3g} > {atol} (largest reference entry {scale:.3g})"
