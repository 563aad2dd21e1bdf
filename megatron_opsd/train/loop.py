"""The training loop over a run's components: each hop of a step is one call.

:meth:`Trainer.train_step` takes a step's problems to samples (``_samples``: rollouts from the
engine, then ``Algorithm.samples``), to this rank's micro-batches (``data.batching``), to the step
runner; :meth:`Trainer.run` adds the weight sync, metrics, evaluation and checkpoints around it.
The README's "One step" follows the data through these hops.

Choices:
- The rollout engine lives on global rank 0 only and its rollouts are broadcast: one copy of the
  generator's weights per job (not per rank), and the rollouts are a function of the weights and
  the seed alone, not of the parallel layout. Evaluation also runs on rank 0, the others wait. An
  error on rank 0 (engine, eval) is raised on every rank (``parallel.broadcast_from_rank0``).
- Each step samples with its own seed, derived from ``(seed, step)``: a resumed run draws exactly
  the rollouts of the uninterrupted one. For that the engine must hold the same weights as well,
  so ``checkpoint.interval`` must be a multiple of ``rollout.sync.interval`` (validated). The
  first sync happens before step 1 (and resyncs a resumed run), so the probe check runs before
  anything is trained. With ``rollout.async: 1`` step t+1's rollouts are drawn while step t
  trains, from the weights before step t, and finish before the sync after it
  (``train/rollouts.py``); they are checkpointed, so resuming stays exact.
- SIGTERM (preemption) or SIGINT stops the run at the next phase boundary, the same one on every
  rank (one all-reduce at each): after a step's training, before its weight sync and evaluation
  (a resumed run syncs first anyway), or after its checkpoint. It writes a checkpoint there and
  ``run_dir/stopped.json``, which tells a launcher the run stopped rather than failed
  (``processes.StopRequests``, ``RunStopped``).
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core.utils import unwrap_model

from megatron_opsd.config import ConfigError
from megatron_opsd.data.batching import rank_micro_batches
from megatron_opsd.data.packing import MicroBatch
from megatron_opsd.data.sample import Sample
from megatron_opsd.eval.evaluate import write_report
from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.models.bridge import write_hf_model
from megatron_opsd.models.peft_format import write_peft_adapters
from megatron_opsd.parallel import teardown
from megatron_opsd.platform import current_device
from megatron_opsd.processes import RunStopped, StopRequests, end_children_with_this_process
from megatron_opsd.rollout.engine import rollout_samples, rollout_stats
from megatron_opsd.tracking import CONFIG_FILE, Tracker
from megatron_opsd.train.components import Components, build_components
from megatron_opsd.train.config import TrainConfig

log = logging.getLogger(__name__)

STOPPED = "stopped.json"  # in run_dir while the run is stopped by a signal before its last step


class Trainer:
    """Runs the loop of one run over its parts on this rank; resumes from the latest checkpoint
    (``checkpoint.load``, else ``checkpoint.dir``) when there is one."""

    def __init__(self, parts: Components):
        self.parts = parts
        self.cfg = parts.cfg
        self.is_rank0 = dist.get_rank() == 0
        self.run_dir = Path(self.cfg.run_dir)
        self.start_step = self._resume()

    def _resume(self) -> int:
        path = self.parts.resume_from
        if path is None:
            return 0
        step = self.parts.checkpointer.load(path)
        if step > self.cfg.steps:
            raise ConfigError(f"{path} is at step {step}, past steps={self.cfg.steps}: nothing to train (raise steps "
                              f"to continue the run; its results are left as they are)")
        log.info("resumed from %s at step %d", path, step)
        return step

    def _samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """The step's problems -> the algorithm's samples (via rollouts when it trains on them), and
        the rollout and algorithm metrics."""
        parts = self.parts
        batch = parts.rollouts.take(step, self.cfg.steps, parts.engine)
        if batch.rollouts is None:
            return parts.algorithm.samples(batch.problems, None)
        flat = [r for group in batch.rollouts for r in group]
        generated = sum(len(r.response_ids) for r in flat)  # summed over steps: the x axis of `opsd compare`
        metrics = {**rollout_stats(flat), "time/rollout": batch.seconds, "rollout/generated_tokens": float(generated),
                   "tokens_per_s/rollout": generated / batch.seconds}
        if parts.weight_sync is not None:  # optimizer steps between the weights that sampled and those that train
            metrics["rollout/weight_version_lag"] = float(step - 1 - batch.version)
        samples, algorithm_metrics = parts.algorithm.samples(batch.problems, rollout_samples(batch.prompts,
                                                                                             batch.rollouts))
        return samples, {**metrics, **algorithm_metrics}

    @staticmethod
    def _stop_requested(stop: StopRequests) -> int:
        """The signal any rank received (collective, so that all ranks stop at the same boundary); 0: none."""
        signum = torch.tensor(stop.requested or 0, device=current_device())
        if dist.get_world_size() > 1:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)

    def _stop(self, signum: int, step: int, saved: bool) -> None:
        """End the run after ``step``: its checkpoint (unless written already), the ``stopped.json``
        a launcher reads (requeue, or not), then :class:`RunStopped`."""
        checkpointer = self.parts.checkpointer
        if not saved:
            checkpointer.save(step, now=True)
        checkpoint = checkpointer.path(step)
        if self.is_rank0:
            write_report(self.run_dir / STOPPED, {"signal": signal.Signals(signum).name, "step": step,
                                                  "checkpoint": None if checkpoint is None else str(checkpoint)})
        raise RunStopped(signum, step, None if checkpoint is None else str(checkpoint))

    def export_hf(self) -> Path:
        """The current weights as a Hugging Face directory ``run_dir/hf`` (config, safetensors,
        tokenizer; with LoRA the merged weights, and the adapters alone in PEFT's format in
        ``run_dir/adapter``)."""
        chunks = [unwrap_model(chunk) for chunk in self.parts.chunks]
        if self.cfg.model.lora is not None:
            write_peft_adapters(chunks, self.run_dir / "adapter", self.cfg.model.lora, base_model=self.cfg.model.hf)
        return write_hf_model(chunks, self.run_dir / "hf", self.parts.write_hf_files, overwrite=True)

    def step_batches(self, step: int) -> tuple[list[MicroBatch], dict[str, float]]:
        """Step ``step``'s problems -> samples -> this rank's micro-batches, and the rollout metrics."""
        samples, metrics = self._samples(step)
        parts = self.parts
        return rank_micro_batches(samples, self.cfg.packing, parts.groups, parts.pad_multiple, parts.pad_id), metrics

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on step ``step``'s micro-batches; its metrics."""
        batches, metrics = self.step_batches(step)
        return {**self.parts.runner(batches).metrics, **metrics}

    def run(self) -> dict[str, Any] | None:
        """Train from ``start_step`` to ``cfg.steps``; returns the last step's metrics and the last eval,
        or None when the run had already finished (its files are left as they are)."""
        cfg, start, parts = self.cfg, self.start_step, self.parts
        weights, evaluator, checkpointer = parts.engine_weights, parts.evaluator, parts.checkpointer
        if start == cfg.steps:
            if cfg.export_hf and not (self.run_dir / "hf").is_dir():  # stopped between the last step and its export
                self.export_hf()
            return None
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        if self.is_rank0:
            (self.run_dir / STOPPED).unlink(missing_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with Tracker(cfg.tracking, self.run_dir, start_step=start + 1 if start else 0, run_config=cfg.model_dump(),
                     enabled=self.is_rank0) as tracker, StopRequests(cfg.checkpoint.stop_grace_s, cfg.checkpoint.stop_file) as stop:
            evaluator.progress = tracker.enabled and cfg.tracking.progress
            pending = weights.push(version=start)  # its metrics join the next record
            if start == 0 and evaluator.due_at_start():
                last_eval = evaluator.run(0)
                tracker.log({**pending, **last_eval}, step=0)
                pending = {}
            steps = tracker.progress(range(start + 1, cfg.steps + 1), desc=cfg.algorithm.name, total=cfg.steps,
                                     initial=start)
            for step in steps:
                metrics = {**pending, **self.train_step(step)}
                pending = {}
                parts.rollouts.settle()  # the next step's, drawn ahead, come from the weights before this sync
                signum = self._stop_requested(stop)
                if signum and step < cfg.steps:  # before the sync and the evaluation
                    tracker.log(metrics, step=step)
                    self._stop(signum, step, saved=False)
                evaluating = evaluator.due(step)
                if weights.due(step, evaluating):
                    metrics.update(weights.push(version=step))
                if evaluating:
                    last_eval = evaluator.run(step)
                    metrics.update(last_eval)
                tracker.log(metrics, step=step)
                last_metrics = metrics
                if hasattr(steps, "set_postfix"):
                    steps.set_postfix(loss=f"{metrics['loss']:.4f}")
                saved = checkpointer.save(step)
                signum = self._stop_requested(stop)
                if signum and step < cfg.steps:
                    self._stop(signum, step, saved)
            if cfg.export_hf:
                self.export_hf()
        return {"steps": cfg.steps, "metrics": last_metrics, "eval": last_eval}


def train(cfg: TrainConfig, build: Callable[[TrainConfig], Components] = build_components) -> dict[str, Any] | None:
    """Run ``cfg`` on this process (alone, or as one rank under torchrun); tears down the process
    group it created. ``build`` makes the run's components (e.g. ``build_components`` with one
    part replaced). Every process the run forks (checkpoint writers and their Manager) dies with it."""
    end_children_with_this_process()
    owns_group = not dist.is_initialized()
    parts = None
    try:
        parts = build(cfg)
        return Trainer(parts).run()
    finally:
        if parts is not None:
            parts.close()
        teardown()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
