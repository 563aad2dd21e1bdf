"""Configs of short training runs on a tiny model with the shipped tokenizer and arithmetic data,
shared by the end-to-end test modules."""
from __future__ import annotations

from pathlib import Path

import yaml

from megatron_opsd.config import load_config
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, hf_dir: Path, **top) -> Path:
    """``tmp_path/config.yaml``: 3 OPSD steps of 3 prompts from the model at ``hf_dir``, a checkpoint
    every step, a 2-problem greedy eval at the end; ``top`` replaces whole top-level sections."""
    cfg = {
        "run_dir": str(tmp_path / "run"), "seed": 3, "steps": 3, "prompts_per_step": 3,
        "tokenizer": str(REPO / "data/tokenizer"), "model": {"hf": str(hf_dir)},
        "data": {"path": str(REPO / "data/arith/train.jsonl")},
        "prompts": {"max_student_prompt_tokens": 128, "max_teacher_prompt_tokens": 384},
        "packing": {"tokens_per_micro_batch": 256, "teacher_tokens_per_micro_batch": 512},
        "rollout": {"max_new_tokens": 12, "stop_tokens": ["<|im_end|>"],
                    "sync": {"probe_tolerance": 1e-3, "probe_tokens": 48}},
        "optim": {"lr": 1e-3, "clip_grad": 1.0},
        "checkpoint": {"dir": str(tmp_path / "run" / "ckpt"), "interval": 1, "keep_last": 2},
        "eval": {"data": {"path": str(REPO / "data/arith/test.jsonl"), "shuffle": False}, "limit": 2, "k": 1,
                 "temperature": 0.0, "max_new_tokens": 8, "stop_tokens": ["<|im_end|>"]},
        "tracking": {"wandb": False, "progress": False},
        **top,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_train(path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, path, list(overrides))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
