"""Shared pieces of the trainer workers: a tiny model at any layout, synthetic problems with
recorded rollouts, a minimal loop, and full (TP-gathered, HF-named) gradients for comparisons."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.data.prompts import SequencePair
from megatron_opsd.data.sources import Problem, ProblemIterator, ProblemSet
from megatron_opsd.models import build_model
from megatron_opsd.models.bridge import export_hf_tensors, load_hf_weights
from megatron_opsd.opsd.loss import LossConfig
from megatron_opsd.opsd.step import OPSDStep, StepConfig, rank_micro_batches
from megatron_opsd.opsd.teacher import Teacher, TeacherConfig
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.rollout.engine import RecordedRolloutEngine, Rollout, SamplingParams
from megatron_opsd.train.checkpoint import load_checkpoint, resolve, save_checkpoint
from megatron_opsd.train.optim import OptimConfig, build_optimizer, use_distributed_optimizer, wrap_for_training

VOCAB = 1000  # tests/tiny_models.py CONFIGS["qwen3"]
SAMPLING = SamplingParams(max_new_tokens=10, stop_token_ids=(7,))


def args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--work", required=True)
    return parser.parse_known_args()[0]


@dataclass
class Trainer:
    step: OPSDStep
    chunks: list  # DDP-wrapped

    @property
    def model(self):
        return unwrap_model(self.chunks[0])

    @property
    def teacher(self) -> Teacher:
        return self.step.teacher


def make_trainer(hf_dir: str, tp: int = 1, pp: int = 1, teacher: str = "fixed", lr: float = 3e-3,
                 distributed_optimizer: bool | None = None, total_steps: int = 10, ema_decay: float = 0.9,
                 max_consecutive_skips: int = 3, schedule: str = "constant", warmup_steps: int = 0) -> Trainer:
    initialize(Layout(tp=tp, pp=pp), seed=1234)
    chunks = build_model(hf_dir)
    load_hf_weights(chunks, hf_dir)
    ocfg = OptimConfig(lr=lr, clip_grad=1.0, distributed_optimizer=distributed_optimizer,
                       schedule=schedule, warmup_steps=warmup_steps)
    ddp = wrap_for_training(chunks, chunks[0].config, use_distributed_optimizer(ocfg))
    optimizer, scheduler = build_optimizer(ocfg, ddp, total_steps)
    tcher = Teacher(TeacherConfig(mode=teacher, ema_decay=ema_decay), [p for c in ddp for p in c.parameters()])
    step = OPSDStep(ddp, optimizer, scheduler, tcher, LossConfig(vocab_size=VOCAB),
                    StepConfig(max_consecutive_skips=max_consecutive_skips))
    return Trainer(step, ddp)


# ------------------------------------------------------------------ data: problems -> rollouts -> pairs
def _ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, VOCAB, (n,), generator=g).tolist()


def student_prompt(p: Problem) -> list[int]:
    return [1] + _ids(p.index, 3 + p.index % 5)


def teacher_prompt(p: Problem) -> list[int]:
    return [1] + _ids(p.index, 3 + p.index % 5) + [2] + _ids(10_000 + p.index, 6 + p.index % 7)


def problems(n: int = 24) -> ProblemSet:
    items = tuple(Problem(i, f"problem {i}", f"solution {i}", None) for i in range(n))
    return ProblemSet("synthetic", items, n, 0)


def recorded_engine(ps: ProblemSet) -> RecordedRolloutEngine:
    records = {}
    for p in ps.problems:
        response = _ids(20_000 + p.index, 4 + p.index % 9)
        records[tuple(student_prompt(p))] = [Rollout(tuple(response), tuple([-1.0] * len(response)), "stop")]
    return RecordedRolloutEngine(records)


def pairs_for(items: list[Problem], engine: RecordedRolloutEngine) -> list[SequencePair]:
    rollouts = engine.generate([student_prompt(p) for p in items], SAMPLING)
    return [SequencePair(tuple(student_prompt(p) + list(r[0].response_ids)),
                         tuple(teacher_prompt(p) + list(r[0].response_ids)),
                         len(student_prompt(p)), len(teacher_prompt(p)))
            for p, r in zip(items, rollouts)]


def fixed_pairs(n: int = 7) -> list[SequencePair]:
    """An odd count: the DP=2 split is uneven, so the global token mean is really global."""
    ps = problems(n)
    return pairs_for(list(ps.problems), recorded_engine(ps))


def run(trainer: Trainer, it: ProblemIterator, engine: RecordedRolloutEngine, steps: int,
        per_step: int = 6, tokens_per_micro_batch: int = 48) -> list[float]:
    """The loop in miniature: draw prompts, roll out, pair, pack this rank's share, step."""
    losses = []
    for _ in range(steps):
        items = it.take(per_step)
        rollouts = [r[0] for r in engine.generate([student_prompt(p) for p in items], SAMPLING)]
        batches = rank_micro_batches(pairs_for(items, engine), PackingConfig(tokens_per_micro_batch=tokens_per_micro_batch))
        metrics = trainer.step(batches, rollouts, rollout_seconds=1.0).metrics
        assert metrics["response_len_max"] <= SAMPLING.max_new_tokens and 0 <= metrics["truncation_rate"] <= 1
        losses.append(metrics["loss"])
    return losses


# ------------------------------------------------------------------ gradients
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


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Finalized gradients (after the student pass) as full HF-named tensors on every rank."""
    model = trainer.model
    with _params_hold(model, [p.main_grad for p in model.parameters()]):
        return {name: t.clone() for name, t in export_hf_tensors([model])}


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in export_hf_tensors([trainer.model])}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: names differ: {sorted(got.keys() ^ want.keys())}"
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    scale = max(t.abs().max().item() for t in want.values())
    assert scale > 0, f"{what}: reference is all zeros"
    assert worst <= atol, f"{what}: max abs difference {worst:.3g} > {atol} (largest reference entry {scale:.3g})"


def work_path(name: str) -> Path:
    return Path(args().work) / name


# ------------------------------------------------------------------ checkpointed loop
def save(trainer: Trainer, root: Path, step: int, it: ProblemIterator, keep_last: int = 2) -> Path:
    s = trainer.step
    state = {"data": it.state_dict(), "step": s.state_dict()}
    return save_checkpoint(root, step, trainer.chunks, s.optimizer, s.scheduler, s.teacher, state, keep_last)


def load(trainer: Trainer, root: Path, it: ProblemIterator) -> int:
    s = trainer.step
    common = load_checkpoint(resolve(root), trainer.chunks, s.optimizer, s.scheduler, s.teacher)
    it.load_state_dict(common["trainer"]["data"])
    s.load_state_dict(common["trainer"]["step"])
    return common["step"]


# The resume scenario: DP=2 with the distributed optimizer, an EMA teacher and a warmup + cosine
# schedule, so that every piece of state (optimizer moments and step, teacher, scheduler, data
# position) has to come back for the losses to match.
RESUME = {"teacher": "ema", "schedule": "cosine", "warmup_steps": 2, "total_steps": 6, "distributed_optimizer": True}


def resume_data() -> tuple[ProblemIterator, RecordedRolloutEngine]:
    ps = problems(24)
    return ProblemIterator(ps, seed=7), recorded_engine(ps)
