"""The parts one training run is made of, built from its config in one place.

:func:`build_components` reads a :class:`TrainConfig` and returns :class:`Components`: data,
model, optimizer, algorithm, step runner, rollout engine, weight sync, and the hooks checkpoints
need. The loop (``train/loop.py``) only uses them. A test builds them the same way and replaces
one part (``dataclasses.replace(components, weight_sync=Counting())``) instead of patching
product code; a part that another holds must be replaced together with it (the weight sync holds
the engine).
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import PretrainedConfig

from megatron_opsd.algorithms.base import Algorithm
from megatron_opsd.algorithms.factory import build_algorithm
from megatron_opsd.config import ConfigError
from megatron_opsd.data.prompts import PromptBuilder, load_tokenizer
from megatron_opsd.data.sources import Problem, ProblemIterator, load_problems
from megatron_opsd.fileio import CheckpointError
from megatron_opsd.models import build_model
from megatron_opsd.models import checkpoint as model_checkpoint
from megatron_opsd.models.bridge import load_hf_weights
from megatron_opsd.models.checkpoint import ShardedStateful, Stateful
from megatron_opsd.models.lora import add_adapters, has_adapters
from megatron_opsd.models.peft_format import load_peft_adapters
from megatron_opsd.parallel import Layout, ParallelGroups, initialize, on_rank0
from megatron_opsd.platform import current_device, release_free_host_memory
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.rollout.factory import build_engine
from megatron_opsd.rollout.sync.base import ProbeCheck, WeightSync
from megatron_opsd.rollout.sync.factory import build_weight_sync, process_environment
from megatron_opsd.train.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    checkpoint_config,
    latest_intact,
    resolve,
)
from megatron_opsd.train.config import TrainConfig, config_differences
from megatron_opsd.train.evaluation import Evaluator
from megatron_opsd.train.optim import build_optimizer, use_distributed_optimizer, wrap_for_training
from megatron_opsd.train.rollouts import RolloutSource
from megatron_opsd.train.step import StepRunner
from megatron_opsd.train.weights import EngineWeights

log = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything one run is made of, on this rank."""

    cfg: TrainConfig
    groups: ParallelGroups           # this rank's process groups of the run's layout
    tokenizer: Any
    hf_config: PretrainedConfig
    prompts: PromptBuilder
    data: ProblemIterator            # the training problems, drawn in a resumable order
    eval_problems: list[Problem]     # held-out problems (empty: no evaluation)
    chunks: list[torch.nn.Module]    # this rank's model chunks, DDP-wrapped
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    algorithm: Algorithm
    runner: StepRunner
    rollouts: RolloutSource          # each step's problems and rollouts (at the step or one ahead)
    engine: RolloutEngine | None     # on global rank 0 when the run needs one, else None
    weight_sync: WeightSync | None   # on every rank when the engine samples from the trainer's weights
    pad_multiple: int                # packed rows are padded to it (sequence parallelism splits by TP)
    pad_id: int
    resume_from: Path | None = None  # the checkpoint whose every part the run restores before its first step

    def states(self) -> dict[str, Stateful | ShardedStateful]:
        """The checkpoint parts of this run, by name."""
        return {"model": ModelState(self.chunks), "optimizer": OptimizerState(self.optimizer, self.chunks),
                "scheduler": self.scheduler, "data": self.data, "runner": self.runner, "rng": RNGState(self.groups),
                **({"rollouts_ahead": self.rollouts} if self.rollouts.ahead else {}), **self.algorithm.states()}

    def write_hf_files(self, out: Path) -> None:
        """The model's HF config and the tokenizer: what an HF export or a checkpoint needs besides the weights."""
        write_hf_files(out, self.hf_config, self.cfg.model.dtype, self.tokenizer)

    # The parts that decide when they act, made from the fields above (so a test that replaces
    # ``weight_sync`` or ``engine`` gets parts over its replacement).

    @functools.cached_property
    def engine_weights(self) -> EngineWeights:
        return EngineWeights(self.weight_sync, self.cfg.rollout.sync.interval)

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator(self.cfg.eval, self.eval_problems, self.prompts, self.engine, Path(self.cfg.run_dir),
                         self.cfg.steps)

    @functools.cached_property
    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.cfg.checkpoint, self.cfg.checkpoint_root(), self.states(), self.groups,
                            self.write_hf_files, self.cfg.model_dump(mode="json"), self.cfg.steps)

    def close(self) -> None:
        """End what the run started, the last built first: drawing ahead, the weight sync, the engine."""
        self.rollouts.close()
        self.engine_weights.close()
        if self.engine is not None:
            self.engine.close()


def write_hf_files(out: Path, hf_config: PretrainedConfig, dtype: str, tokenizer: Any) -> None:
    """``hf_config`` (its dtype: the training dtype, which exported weights are in) and the tokenizer, in ``out``."""
    config = copy.deepcopy(hf_config)
    config.dtype = getattr(torch, dtype)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_components(cfg: TrainConfig) -> Components:
    """Initialize the parallel layout and build every part of the run ``cfg`` describes.

    Data comes first: a bad row should fail before minutes of model building.
    """
    for name, value in process_environment(cfg.rollout.sync, cfg.rollout.engine, torch.cuda.is_available()).items():
        os.environ.setdefault(name, value)
    groups = initialize(Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp), seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    prompts = PromptBuilder(tokenizer, cfg.prompts)
    problems = prompts.fitting(load_problems(cfg.data), cfg.data.on_invalid_row)
    eval_problems = list(load_problems(cfg.eval.data).problems[:cfg.eval.limit]) if cfg.eval.data is not None else []
    sampling = cfg.rollout.params(tokenizer)

    hf_config = cfg.model.hf_config()
    if len(tokenizer) > hf_config.vocab_size:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size={hf_config.vocab_size}")
    start, resume = start_point(cfg)
    chunks = build_model(hf_config, getattr(torch, cfg.model.dtype), groups=groups)
    if cfg.model.hf is not None:
        load_hf_weights(chunks, cfg.model.hf)
    if start is not None and not resume:  # a warm start: the weights, before the teacher copies them
        if cfg.model.lora is None and model_checkpoint.read_lora_manifest(start) is not None:
            raise ConfigError(f"checkpoint.load={start} holds LoRA adapters; this run trains every weight: merge them "
                              f"first (opsd convert megatron-to-hf) and start from that model.hf, or set model.lora")
        model_checkpoint.load(chunks, start)
    if cfg.model.lora is not None and not has_adapters(chunks):  # a warm start from adapters brought them
        add_adapters(chunks, cfg.model.lora, cfg.seed)
        if cfg.model.lora.init_from is not None:
            load_peft_adapters(chunks, cfg.model.lora.init_from, cfg.model.lora)
    chunks = wrap_for_training(chunks, use_distributed_optimizer(cfg.optim, groups))
    optimizer, scheduler = build_optimizer(cfg.optim, chunks, cfg.steps)
    logprob_temperature = cfg.rollout.temperature or 1.0  # an engine reports T=1 log-probs for greedy
    algorithm = build_algorithm(cfg.algorithm, chunks, prompts, sampling.stop_token_ids, hf_config.vocab_size,
                                logprob_temperature)
    runner = StepRunner(chunks, optimizer, scheduler, algorithm, cfg.step)

    needs_engine = algorithm.rollouts_per_prompt > 0 or bool(eval_problems)
    run_dir = Path(cfg.run_dir)
    write_files = functools.partial(write_hf_files, hf_config=hf_config, dtype=cfg.model.dtype, tokenizer=tokenizer)
    engine = None
    if needs_engine:  # on rank 0; a fleet that fails to start fails every rank
        engine = on_rank0(lambda: build_engine(cfg.rollout.engine, hf_config, run_dir / "rollout", write_files,
                                               current_device()))
    weight_sync = None
    if needs_engine:
        # At temperature 1: every engine scores that (vLLM's prompt log-probs ignore temperature), and a
        # wrongly mapped weight shows at any temperature.
        probe = ProbeCheck(chunks, _probe_ids(cfg, prompts, problems.problems[0], sampling.stop_token_ids),
                           1.0, cfg.rollout.sync.probe_tolerance, hf_config.vocab_size)
        weight_sync = build_weight_sync(cfg.rollout.sync, engine, chunks, probe, cfg.rollout.engine,
                                        Path(cfg.rollout.sync.dir or run_dir / "weights"), write_files,
                                        rollouts_ahead=bool(cfg.rollout.async_))
    data = ProblemIterator(problems, cfg.data.seed, cfg.data.shuffle)
    rollouts = RolloutSource(data, prompts, sampling, algorithm.rollouts_per_prompt, cfg.prompts_per_step, cfg.seed,
                             ahead=bool(cfg.rollout.async_), checks_versions=weight_sync is not None)
    release_free_host_memory()
    return Components(
        cfg=cfg, groups=groups, tokenizer=tokenizer, hf_config=hf_config, prompts=prompts, data=data, eval_problems=eval_problems,
        chunks=chunks, optimizer=optimizer, scheduler=scheduler, algorithm=algorithm, runner=runner,
        rollouts=rollouts, engine=engine, weight_sync=weight_sync,
        pad_multiple=cfg.parallel.tp if chunks[0].config.sequence_parallel else 1, pad_id=tokenizer.pad_token_id or 0,
        resume_from=start if resume else None)


def start_point(cfg: TrainConfig) -> tuple[Path | None, bool]:
    """(the checkpoint the run starts from, whether it resumes it) (collective).

    The run's own newest intact checkpoint is resumed if its config differs from the run's only in
    keys that may change on resume (``train.config.RESUMABLE``), and is an error naming the others
    otherwise: a run never silently continues another. Without one, ``checkpoint.load`` is resumed
    when its config matches that way, and is a warm start (its model weights only) when it does not.
    """
    current = cfg.model_dump(mode="json")
    own = cfg.checkpoint_root()
    path = latest_intact(own) if own is not None and own.is_dir() else None
    if path is not None:
        differences = config_differences(checkpoint_config(path), current)
        if differences:
            raise CheckpointError(
                f"{path} was written by a run with another config ({'; '.join(differences)}); a run resumes only its "
                f"own checkpoints: start this one in another run_dir (with checkpoint.load={path} to start from its "
                f"weights), or restore the config")
        return path, True
    if cfg.checkpoint.load is None:
        return None, False
    path = resolve(Path(cfg.checkpoint.load))
    if path is None:
        raise CheckpointError(f"checkpoint.load={cfg.checkpoint.load}: no checkpoint there")
    differences = config_differences(checkpoint_config(path), current)
    if differences:
        log.warning("warm start from %s: its model weights; optimizer, data order and step start anew (it was "
                    "written by a run with another config: %s)", path, "; ".join(differences))
    return path, not differences


def _probe_ids(cfg: TrainConfig, prompts: PromptBuilder, problem: Problem, end_ids: tuple[int, ...]) -> list[int]:
    """The probe sequence: the first training problem's prompt and solution, or its answer in a data set
    without solutions (and end-of-turn)."""
    response = problem.solution if problem.solution is not None else problem.answer or ""
    ids = prompts.student_ids(problem) + prompts.tokenizer.encode(response, add_special_tokens=False)
    return (ids + list(end_ids))[:cfg.rollout.sync.probe_tokens]

