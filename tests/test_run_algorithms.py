"""What each algorithm trains on and how: SFT's cross-entropy against transformers and its samples, OPSD's
samples with their teacher side."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_opsd.algorithms.opsd import OPSD, OPSDConfig
from megatron_opsd.algorithms.opsd.divergence import LossConfig
from megatron_opsd.algorithms.sft import SFT, SFTConfig
from megatron_opsd.cli import main
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig
from megatron_opsd.data.sources import DataConfig, ProblemIterator, load_problems
from megatron_opsd.rollout.engine import Rollout, rollout_samples
from megatron_opsd.tracking import read_metrics
from tests.support.train_configs import losses, write_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_sft_samples_render_the_requested_share_with_the_teacher_prompt():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/tokenizer")
    builder = PromptBuilder(tokenizer, PromptConfig())
    items = list(load_problems(DataConfig(path=str(REPO / "data/arith/test.jsonl"))).problems[:4])
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    sft = SFT(SFTConfig(teacher_prompt_fraction=0.5), builder, end, vocab_size=1000)
    samples, _ = sft.samples(items, None)
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
    samples, _ = opsd.samples(items, rollouts)
    for item, sample, (rollout,) in zip(items, samples, rollouts):
        teacher = builder.teacher_ids(item)
        assert sample.teacher_ids == tuple(teacher) + rollout.response_ids  # the response follows both prompts
        assert sample.student_ids == rollout.student_ids and sample.rollout_logprobs == rollout.rollout_logprobs
        assert "=== Reference Solution Begin ===" in tokenizer.decode(teacher) and sample.weight_version == 3
