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
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megatron_opsd.config import ConfigError
from megatron_opsd.data.batching import rank_micro_batches
from megatron_opsd.data.packing import MicroBatch
from megatron_opsd.data.sample import Sample
from megatron_opsd.eval.evaluate import evaluate, write_report
from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.models.bridge import write_hf_model
from megatron_opsd.models.peft_format import write_peft_adapters
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.platform import current_device
from megatron_opsd.processes import RunStopped, StopRequests, end_children_with_this_process
from megatron_opsd.rollout.engine import rollout_samples, rollout_stats
from megatron_opsd.tracking import CONFIG_FILE, Tracker
from megatron_opsd.train.checkpoint import load_checkpoint, save_checkpoint
from megatron_opsd.train.components import Components, build_components
from megatron_opsd.train.config import TrainConfig

log = logging.getLogger(__name__)

STOPPED = "stopped.json"  # in run_dir while the run is stopped by a signal before its last step


class Trainer:
    """Runs the loop of one run over its components on this rank; resumes from the latest
    checkpoint (``checkpoint.load``, else ``checkpoint.dir``) when there is one."""

    def __init__(self, components: Components):
        self.c = components
        self.cfg = components.cfg
        self.is_rank0 = dist.get_rank() == 0
        self.run_dir = Path(self.cfg.run_dir)
        self.checkpoint_root = self.cfg.checkpoint_root()
        self.states = components.states()
        self.start_step = self._resume()

    def _resume(self) -> int:
        path = self.c.resume_from
        if path is None:
            return 0
        step = load_checkpoint(path, self.states)
        if step > self.cfg.steps:
            raise ConfigError(f"{path} is at step {step}, past steps={self.cfg.steps}: nothing to train (raise steps "
                              f"to continue the run; its results are left as they are)")
        log.info("resumed from %s at step %d", path, step)
        return step

    def _samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """The step's problems -> the algorithm's samples (via rollouts when it trains on them), and
        the rollout metrics."""
        c = self.c
        batch = c.rollouts.take(step, self.cfg.steps, c.engine)
        if batch.rollouts is None:
            return c.algorithm.samples(batch.problems, None), {}
        flat = [r for group in batch.rollouts for r in group]
        generated = sum(len(r.response_ids) for r in flat)  # summed over steps: the x axis of `opsd compare`
        metrics = {**rollout_stats(flat), "time/rollout": batch.seconds, "rollout/generated_tokens": float(generated),
                   "tokens_per_s/rollout": generated / batch.seconds}
        if c.weight_sync is not None:  # optimizer steps between the weights that sampled and those that train
            metrics["rollout/weight_version_lag"] = float(step - 1 - batch.version)
        return c.algorithm.samples(batch.problems, rollout_samples(batch.prompts, batch.rollouts)), metrics

    def _evaluate(self, step: int, tracker: Tracker) -> dict[str, float]:
        """Eval metrics as ``eval/<name>`` (computed on rank 0, known to every rank)."""
        out = self.run_dir / "eval" / f"step_{step:06d}.json"

        def metrics() -> dict[str, float]:
            report = evaluate(self.c.engine, self.c.eval_problems, self.c.prompts, self.cfg.eval, out=out,
                              progress=tracker.enabled and self.cfg.tracking.progress)
            return {f"eval/{name}": value for name, value in report["metrics"].items()}

        return broadcast_from_rank0(metrics)

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
        if self.checkpoint_root is not None and not saved:
            self._save(step)
        checkpoint = str(self.checkpoint_root / f"step_{step:06d}") if self.checkpoint_root else None
        if self.is_rank0:
            write_report(self.run_dir / STOPPED, {"signal": signal.Signals(signum).name, "step": step,
                                                  "checkpoint": checkpoint})
        raise RunStopped(signum, step, checkpoint)

    def _save(self, step: int) -> None:
        save_checkpoint(self.checkpoint_root, step, self.states, self.cfg.checkpoint.keep_last,
                        write_hf_files=self.c.write_hf_files, config=self.cfg.model_dump(mode="json"))

    def export_hf(self) -> Path:
        """The current weights as a Hugging Face directory ``run_dir/hf`` (config, safetensors,
        tokenizer; with LoRA the merged weights, and the adapters alone in PEFT's format in
        ``run_dir/adapter``)."""
        chunks = [unwrap_model(chunk) for chunk in self.c.chunks]
        if self.cfg.model.lora is not None:
            write_peft_adapters(chunks, self.run_dir / "adapter", self.cfg.model.lora, base_model=self.cfg.model.hf)
        return write_hf_model(chunks, self.run_dir / "hf", self.c.write_hf_files, overwrite=True)

    def step_batches(self, step: int) -> tuple[list[MicroBatch], dict[str, float]]:
        """Step ``step``'s problems -> samples -> this rank's micro-batches, and the rollout metrics."""
        samples, metrics = self._samples(step)
        return rank_micro_batches(samples, self.cfg.packing, self.c.pad_multiple, self.c.pad_id), metrics

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on step ``step``'s micro-batches; its metrics."""
        batches, metrics = self.step_batches(step)
        return {**self.c.runner(batches).metrics, **metrics}

    def run(self) -> dict[str, Any] | None:
        """Train from ``start_step`` to ``cfg.steps``; returns the last step's metrics and the last eval,
        or None when the run had already finished (its files are left as they are)."""
        cfg, start, sync = self.cfg, self.start_step, self.c.weight_sync
        if start == cfg.steps:
            if cfg.export_hf and not (self.run_dir / "hf").is_dir():  # stopped between the last step and its export
                self.export_hf()
            return None
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        evaluates = bool(self.c.eval_problems)
        tracker_start = start + 1 if start else 0
        if self.is_rank0:
            (self.run_dir / STOPPED).unlink(missing_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with Tracker(cfg.tracking, self.run_dir, start_step=tracker_start, run_config=cfg.model_dump(),
                     enabled=self.is_rank0) as tracker, StopRequests(cfg.checkpoint.stop_grace_s, cfg.checkpoint.stop_file) as stop:
            pending: dict[str, float] = {}  # the first sync's metrics join the next record
            if sync is not None:
                pending = sync.push(version=start)
            if start == 0 and cfg.eval.at_start and evaluates:
                last_eval = self._evaluate(0, tracker)
                tracker.log({**pending, **last_eval}, step=0)
                pending = {}
            name = cfg.algorithm.name
            steps = tracker.progress(range(start + 1, cfg.steps + 1), desc=name, total=cfg.steps, initial=start)
            for step in steps:
                metrics = {**pending, **self.train_step(step)}
                pending = {}
                self.c.rollouts.settle()  # the next step's, drawn ahead, come from the weights before this sync
                signum = self._stop_requested(stop)
                if signum and step < cfg.steps:  # before the sync and the evaluation
                    tracker.log(metrics, step=step)
                    self._stop(signum, step, saved=False)
                evaluate_now = evaluates and (step == cfg.steps or (cfg.eval.interval and step % cfg.eval.interval == 0))
                if sync is not None and (step % cfg.rollout.sync.interval == 0 or evaluate_now):
                    metrics.update(sync.push(version=step))
                if evaluate_now:
                    last_eval = self._evaluate(step, tracker)
                    metrics.update(last_eval)
                tracker.log(metrics, step=step)
                last_metrics = metrics
                if hasattr(steps, "set_postfix"):
                    steps.set_postfix(loss=f"{metrics['loss']:.4f}")
                saved = self.checkpoint_root is not None and (step % cfg.checkpoint.interval == 0 or step == cfg.steps)
                if saved:
                    self._save(step)
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
    components = None
    try:
        components = build(cfg)
        return Trainer(components).run()
    finally:
        if components is not None:
            components.rollouts.close()
            if components.weight_sync is not None:
                components.weight_sync.close()
            if components.engine is not None:
                components.engine.close()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
