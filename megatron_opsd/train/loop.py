"""The training loop: OPSD (or SFT) steps with rollouts, weight sync, evaluation and checkpoints.

One step of OPSD::

    prompts (ProblemIterator) -> engine.generate (global rank 0) -> broadcast rollouts
    -> PromptBuilder.pair -> rank_micro_batches -> OPSDStep (teacher pass, student pass, optimizer)
    -> every k steps: export_hf_tensors -> engine.update_weights, then the probe check
    -> metrics (Tracker) -> periodic eval -> checkpoint

SFT replaces the rollouts by the reference solutions and OPSDStep by SFTStep.

Choices:
- The rollout engine lives on global rank 0 only and its rollouts are broadcast: one copy of the
  generator's weights per job (not per rank), and the rollouts are a function of the weights and
  the seed alone, not of the parallel layout. Every rank iterates the weight exporter (it is a
  collective); only rank 0 feeds the engine. Evaluation also runs on rank 0, the others wait. An
  error on rank 0 (engine, eval) is raised on every rank, so no rank waits for it until the
  collective timeout.
- Each step samples with its own seed, derived from ``(seed, step)``: a resumed run draws exactly
  the rollouts of the uninterrupted one. For that the engine must hold the same weights as well,
  so ``checkpoint.interval`` must be a multiple of ``rollout.sync_interval`` (validated).
- Probe check after every sync: the engine's log-probs of a fixed probe sequence (the first
  training problem's prompt and solution) must match the trainer's Megatron forward within
  ``rollout.probe_tolerance``; otherwise :class:`ProbeMismatchError` stops the run before a
  wrong weight mapping can train anything (the first sync happens before step 1).
- Rollout-vs-trainer mismatch: the engine reports ``log_softmax(logits / T)`` of each sampled
  token before top-k / top-p; the student pass computes the same quantity for the same tokens
  at the same temperature (``OPSDStep(logprob_temperature=T)``), and the loop logs the mean and
  max of ``|delta log p|`` over all response tokens. With ``sync_interval > 1`` this includes the
  engine's staleness, which is what it should measure.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from megatron_opsd.config import ConfigError
from megatron_opsd.data.packing import MicroBatch
from megatron_opsd.data.prompts import PromptBuilder, SequencePair
from megatron_opsd.data.sources import Problem, ProblemIterator, load_problems
from megatron_opsd.eval.evaluate import evaluate, stop_token_ids
from megatron_opsd.models import build_model, load_hf_config
from megatron_opsd.models.bridge import export_hf_tensors, load_hf_weights
from megatron_opsd.models.forward import forward_only
from megatron_opsd.models.gpt import attention_mask
from megatron_opsd.models.hf_io import atomic_output_dir, write_hf_shards
from megatron_opsd.opsd.step import OPSDStep, StepResult, data_parallel_share, rank_micro_batches
from megatron_opsd.opsd.teacher import Teacher
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.rollout.embedded import EmbeddedEngine
from megatron_opsd.rollout.engine import ProbeMismatchError, Rollout, SamplingParams
from megatron_opsd.tracking import Tracker
from megatron_opsd.train.checkpoint import load_checkpoint, resolve, save_checkpoint
from megatron_opsd.train.config import ModelConfig, TrainConfig
from megatron_opsd.train.metrics import all_reduce_stats
from megatron_opsd.train.optim import build_optimizer, use_distributed_optimizer, wrap_for_training
from megatron_opsd.train.sft import SFTStep, sft_pairs

log = logging.getLogger(__name__)
T = TypeVar("T")


def hf_config_of(cfg: ModelConfig) -> PretrainedConfig:
    """The model's HF config: the directory's, or the inline one (``architectures`` defaults to the
    model type's causal-LM class, e.g. Qwen3ForCausalLM)."""
    if cfg.hf is not None:
        return load_hf_config(cfg.hf)
    fields = dict(cfg.config)
    model_type = fields.pop("model_type")
    fields.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]])
    return AutoConfig.for_model(model_type, **fields)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


class Trainer:
    """The state of one run on this rank; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        initialize(Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp), seed=cfg.seed)
        self.is_rank0 = dist.get_rank() == 0
        self.run_dir = Path(cfg.run_dir)
        # Data first: a bad row should fail before minutes of model building.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        self.builder = PromptBuilder(self.tokenizer, cfg.prompts)
        self.problems = load_problems(cfg.data)
        self.iterator = ProblemIterator(self.problems, cfg.data.seed, cfg.data.shuffle)
        self.eval_problems: list[Problem] = []
        if cfg.eval.data is not None:
            self.eval_problems = list(load_problems(cfg.eval.data).problems[:cfg.eval.limit])
        self.end_ids = stop_token_ids(self.tokenizer, cfg.rollout.stop_tokens)
        self.sampling = SamplingParams(
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=self.end_ids)
        self.logprob_temperature = cfg.rollout.temperature or 1.0  # the engine reports T=1 for greedy

        self.hf_config = hf_config = hf_config_of(cfg.model)
        if len(self.tokenizer) > hf_config.vocab_size:
            raise ConfigError(f"tokenizer {cfg.tokenizer} has {len(self.tokenizer)} tokens, more than the model's "
                              f"vocab_size={hf_config.vocab_size}")
        chunks = build_model(hf_config, getattr(torch, cfg.model.dtype))
        if cfg.model.hf is not None:
            load_hf_weights(chunks, cfg.model.hf)
        self.chunks = wrap_for_training(chunks, chunks[0].config, use_distributed_optimizer(cfg.optim))
        optimizer, scheduler = build_optimizer(cfg.optim, self.chunks, cfg.steps)
        if cfg.algorithm == "sft":
            self.step: OPSDStep = SFTStep(self.chunks, optimizer, scheduler, cfg.loss, cfg.step)
        else:
            teacher = Teacher(cfg.teacher, [p for c in self.chunks for p in c.parameters()])
            self.step = OPSDStep(self.chunks, optimizer, scheduler, teacher, cfg.loss, cfg.step,
                                 logprob_temperature=self.logprob_temperature)
        self.pad_multiple = cfg.parallel.tp if self.chunks[0].config.sequence_parallel else 1
        self.pad_id = self.tokenizer.pad_token_id or 0

        self.checkpoint_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.start_step = self._resume()
        needs_engine = cfg.algorithm == "opsd" or bool(self.eval_problems)
        self.engine = EmbeddedEngine.from_hf_config(hf_config, cfg.rollout.engine) \
            if needs_engine and self.is_rank0 else None
        self.probe = self._probe_ids() if needs_engine else None

    # -- state ------------------------------------------------------------------------------------

    def _resume(self) -> int:
        """Restore the latest checkpoint (``checkpoint.load``, else ``checkpoint.dir``); the step reached."""
        source = self.cfg.checkpoint.load or self.cfg.checkpoint.dir
        path = resolve(source) if source else None
        if path is None:
            return 0
        s = self.step
        common = load_checkpoint(path, self.chunks, s.optimizer, s.scheduler, s.teacher)
        self.iterator.load_state_dict(common["trainer"]["data"])
        s.load_state_dict(common["trainer"]["step"])
        log.info("resumed from %s at step %d", path, common["step"])
        return common["step"]

    def _save(self, step: int) -> None:
        s = self.step
        state = {"data": self.iterator.state_dict(), "step": s.state_dict()}
        save_checkpoint(self.checkpoint_root, step, self.chunks, s.optimizer, s.scheduler, s.teacher, state,
                        self.cfg.checkpoint.keep_last, write_hf_files=self._write_hf_files)

    def _write_hf_files(self, out: Path) -> None:
        """The model's HF config and the tokenizer: what an HF export or a checkpoint needs besides the
        weights. The config's dtype is the training dtype, which the weights are in."""
        config = copy.deepcopy(self.hf_config)
        config.dtype = getattr(torch, self.cfg.model.dtype)
        config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    def _on_engine_rank(self, produce: Callable[[], T]) -> T:
        """``produce()`` on rank 0 (where the engine lives), broadcast to every rank. If it raises,
        every rank raises (rank 0 the original error), instead of the others waiting for rank 0
        in their next collective until the timeout."""
        payload: list[Any] = [None, None]
        error = None
        if self.is_rank0:
            try:
                payload[0] = produce()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error, payload[1] = exc, f"{type(exc).__name__} on rank 0: {exc}"
        dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        if payload[1] is not None:
            raise RuntimeError(payload[1])
        return payload[0]

    # -- rollouts ---------------------------------------------------------------------------------

    def _rollouts(self, prompts: list[list[int]], step: int) -> tuple[list[Rollout], float]:
        """One rollout per prompt, generated on rank 0 and broadcast; and the generation time."""
        start = time.perf_counter()
        params = dataclasses.replace(self.sampling, seed=_seed(self.cfg.seed, step))
        rollouts = self._on_engine_rank(lambda: [r[0] for r in self.engine.generate(prompts, params)])
        return rollouts, time.perf_counter() - start

    def _pairs(self, items: list[Problem], step: int) -> tuple[list[SequencePair], list[Rollout], float]:
        if self.cfg.algorithm == "sft":
            return sft_pairs(items, self.builder, self.end_ids, self.cfg.sft.teacher_prompt_fraction), [], 0.0
        prompts = [self.builder.student_ids(item) for item in items]
        rollouts, seconds = self._rollouts(prompts, step)
        pairs = [self.builder.pair(item, r.response_ids, prompt) for item, r, prompt in zip(items, rollouts, prompts)]
        return pairs, rollouts, seconds

    def _mismatch(self, result: StepResult, batches: Sequence[MicroBatch], pairs: Sequence[SequencePair],
                  rollouts: Sequence[Rollout]) -> dict[str, float]:
        """Mean / max |rollout log-prob - trainer log-prob| over the step's response tokens."""
        diffs = torch.zeros(0)
        if result.target_logprobs is not None:
            share = data_parallel_share(pairs)
            parts = [torch.zeros(0)]
            for mb, trainer in zip(batches, result.target_logprobs, strict=True):
                engine = [lp for i in mb.sample_ids for lp in rollouts[share[i]].logprobs]
                parts.append((trainer.cpu() - torch.tensor(engine)).abs())
            diffs = torch.cat(parts)
        sums = {"sum": float(diffs.sum()), "count": float(diffs.numel())}
        maxes = {"max": float(diffs.max()) if diffs.numel() else 0.0}
        for group in (parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()):
            sums, maxes = all_reduce_stats(sums, maxes, group)
        return {"mismatch/logprob_abs_diff_mean": sums["sum"] / max(sums["count"], 1.0),
                "mismatch/logprob_abs_diff_max": maxes["max"]}

    def export_hf(self) -> Path:
        """The current weights as a Hugging Face directory ``run_dir/hf`` (config, safetensors, tokenizer)."""
        out = self.run_dir / "hf"
        with atomic_output_dir(out, overwrite=True) as tmp:
            stream = export_hf_tensors([unwrap_model(c) for c in self.chunks])
            if self.is_rank0:
                write_hf_shards(stream, tmp)
                self._write_hf_files(tmp)
            else:  # a collective: every rank iterates it
                for _ in stream:
                    pass
        return out

    # -- weight sync and probe --------------------------------------------------------------------

    def _probe_ids(self) -> list[int]:
        item = self.problems.problems[0]
        ids = self.builder.student_ids(item) + self.tokenizer.encode(item.solution, add_special_tokens=False)
        ids = (ids + list(self.end_ids))[:self.cfg.rollout.probe_tokens]
        return ids[:len(ids) - len(ids) % self.cfg.parallel.tp]  # sequence parallelism splits by TP

    def sync_weights(self, version: int) -> dict[str, float]:
        """Stream the trainer's weights into the engine (collective), then run the probe check."""
        start = time.perf_counter()
        stream = export_hf_tensors([unwrap_model(c) for c in self.chunks])
        if not self.is_rank0:  # the exporter is a collective: every rank iterates it; the engine is on rank 0
            for _ in stream:
                pass
        self._on_engine_rank(lambda: self.engine.update_weights(stream, version))
        seconds = time.perf_counter() - start
        return {"time/weight_sync": seconds, "probe/logprob_abs_diff_max": self._probe_check(version)}

    def _probe_check(self, version: int) -> float:
        ids, temperature = self.probe, self.logprob_temperature
        engine = self._on_engine_rank(lambda: self.engine.logprobs([ids], temperature)[0])
        tokens = torch.tensor([ids])
        mb = {"input_ids": tokens, "position_ids": torch.arange(len(ids))[None],
              "attention_mask": attention_mask(torch.zeros_like(tokens))}
        device = next(self.chunks[0].parameters()).device
        mb = {k: v.to(device) for k, v in mb.items()}
        out = forward_only([unwrap_model(c) for c in self.chunks], [mb], output="logits", gather_logits=True)
        worst = torch.zeros((), dtype=torch.float64, device=device)
        if out is not None:
            logits = out[0][0, :-1, :self.cfg.loss.vocab_size].float() / temperature
            trainer = torch.log_softmax(logits, -1).gather(-1, tokens[0, 1:, None].to(device))[:, 0].cpu()
            worst.fill_(float((trainer - engine).abs().max()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if not worst <= self.cfg.rollout.probe_tolerance:
            raise ProbeMismatchError(
                f"after weight sync {version}, the engine's log-probs of the probe sequence ({len(ids)} tokens) "
                f"differ from the trainer's by up to {float(worst):.3g} > rollout.probe_tolerance="
                f"{self.cfg.rollout.probe_tolerance}: the weights did not arrive intact (wrong HF name mapping, "
                f"shape or dtype); stopping before training on rollouts of a different model")
        return float(worst)

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, step: int, tracker: Tracker) -> dict[str, float]:
        """Eval metrics as ``eval/<name>`` (computed on rank 0, known to every rank)."""
        out = self.run_dir / "eval" / f"step_{step:06d}.json"

        def metrics() -> dict[str, float]:
            report = evaluate(self.engine, self.eval_problems, self.builder, self.cfg.eval, out=out,
                              progress=tracker.enabled and self.cfg.tracking.progress)
            return {f"eval/{name}": value for name, value in report["metrics"].items()}

        return self._on_engine_rank(metrics)

    # -- the loop ---------------------------------------------------------------------------------

    def _train_step(self, step: int) -> dict[str, float]:
        """Prompts -> rollouts (or reference solutions) -> packed pairs -> one optimizer step."""
        cfg = self.cfg
        items = self.iterator.take(cfg.prompts_per_step)
        pairs, rollouts, rollout_seconds = self._pairs(items, step)
        batches = rank_micro_batches(pairs, cfg.packing, self.pad_multiple, self.pad_id)
        result = self.step(batches, rollouts, rollout_seconds)
        metrics = dict(result.metrics)
        if cfg.algorithm == "opsd":
            metrics["divergence"] = metrics["loss"]
            metrics.update(self._mismatch(result, batches, pairs, rollouts))
            metrics["time/rollout"] = rollout_seconds
        return metrics

    def run(self) -> dict[str, Any]:
        """Train from ``start_step`` to ``cfg.steps``; returns the last step's metrics and the last eval."""
        cfg, start = self.cfg, self.start_step
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        tracker_start = start + 1 if start else 0
        with Tracker(cfg.tracking, self.run_dir, start_step=tracker_start, run_config=cfg.model_dump(),
                     enabled=self.is_rank0) as tracker:
            pending: dict[str, float] = {}  # the first sync's metrics join the next record
            if self.probe is not None:
                pending = self.sync_weights(version=start)
                if start == 0 and cfg.eval.at_start and self.eval_problems:
                    last_eval = self._evaluate(0, tracker)
                    tracker.log({**pending, **last_eval}, step=0)
                    pending = {}
            steps = tracker.progress(range(start + 1, cfg.steps + 1), desc=cfg.algorithm, total=cfg.steps, initial=start)
            for step in steps:
                metrics = {**pending, **self._train_step(step)}
                pending = {}
                evaluate_now = self.eval_problems and (
                    step == cfg.steps or (cfg.eval.interval and step % cfg.eval.interval == 0))
                if self.probe is not None and (step % cfg.rollout.sync_interval == 0 or evaluate_now):
                    metrics.update(self.sync_weights(version=step))
                if evaluate_now:
                    last_eval = self._evaluate(step, tracker)
                    metrics.update(last_eval)
                tracker.log(metrics, step=step)
                last_metrics = metrics
                if hasattr(steps, "set_postfix"):
                    steps.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.checkpoint_root and (step % cfg.checkpoint.interval == 0 or step == cfg.steps):
                    self._save(step)
            if cfg.export_hf:
                self.export_hf()
        return {"steps": cfg.steps, "metrics": last_metrics, "eval": last_eval}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` on this process (alone, or as one rank under torchrun); tears down the process
    group it created."""
    owns_group = not dist.is_initialized()
    try:
        return Trainer(cfg).run()
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
