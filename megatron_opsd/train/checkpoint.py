"""Atomic, resumable, reshardable training checkpoints (Megatron dist_checkpointing, torch_dist).

One checkpoint holds everything a step depends on: model, optimizer (with its step count),
LR scheduler, teacher weights (fixed/EMA), RNG states, the data iterator position and the
trainer's counters. Layout under the checkpoint root::

    step_000006/      a complete checkpoint (dist_checkpointing files + manifest.json)
    step_000006/hf/   the model's HF config (in the training dtype) and tokenizer files
    latest            the name of the newest complete checkpoint, written last

``hf/`` makes a step directory self-describing like a model checkpoint (``models/checkpoint.py``):
``opsd eval`` and ``opsd convert megatron-to-hf`` read its model weights (and nothing else) from it.

Atomicity: every rank writes into ``.tmp.step_000006``; after a barrier rank 0 writes the
manifest (every file and its size), renames the directory, then replaces ``latest``. A crash at any
point leaves either the previous ``latest`` or the new one, never a half checkpoint behind it.
A damaged checkpoint (missing/truncated file, no manifest) is a CheckpointError naming the file.

Resharding: model, optimizer (``fully_reshardable``) and teacher tensors reshard to another TP/PP/DP
layout. RNG states are per rank and are restored only at the layout they were saved with.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model
from pydantic import Field

from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.models.checkpoint import HF_SUBDIR
from megatron_opsd.opsd.teacher import Teacher
from megatron_opsd.section import Section

LATEST = "latest"
MANIFEST = "manifest.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointConfig(Section):
    dir: str | None = Field(
        default=None, description="checkpoint root (step_NNNNNN/ directories and 'latest'); None: no checkpoints")
    interval: int = Field(
        25, ge=1, description="steps between checkpoints (and the last step); a multiple of rollout.sync_interval")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    load: str | None = Field(
        default=None, description="resume from this checkpoint directory or root; None: from dir if it has one")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, partial or damaged)."""


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), offset, replica_id=0)


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _teacher_sharded(models: dict[str, dict], teacher: Teacher) -> dict:
    """The models' sharded tensors re-pointed at the teacher's tensors, keys prefixed ``teacher.``
    (so the teacher reshards across layouts exactly like the model)."""
    tensors = teacher.state_tensors()
    if tensors is None:
        return {}
    by_param = {id(p): t for p, t in zip(teacher.params, tensors)}
    out = {}
    for model, sd in models.items():
        for name, sh in sd.items():
            if id(getattr(sh, "data", None)) in by_param:
                out[f"{model}.{name}"] = dataclasses.replace(sh, key=f"teacher.{sh.key}", data=by_param[id(sh.data)])
    if len(out) != len(tensors):
        raise CheckpointError(f"teacher checkpoint covers {len(out)} of {len(tensors)} parameters")
    return out


def _state_dict(
    chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer,
    teacher: Teacher,
    is_loading: bool,
    with_rng: bool,
) -> dict[str, Any]:
    models = {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}
    state: dict[str, Any] = dict(models)
    state["optimizer"] = optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=_OPTIM_METADATA)
    state["teacher"] = _teacher_sharded(models, teacher)
    if with_rng:
        state["rng"] = _rng_state()
    return state


def _write_manifest(path: Path) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    (path / MANIFEST).write_text(json.dumps(files, indent=0))


def save_checkpoint(
    root: str | Path,
    step: int,
    chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    teacher: Teacher,
    trainer_state: dict[str, Any],
    keep_last: int,
    write_hf_files: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. ``trainer_state`` (step counters, data iterator position)
    must be identical on all ranks; it is stored once. ``write_hf_files(dir)`` (called on rank 0)
    writes the model's HF config and tokenizer into the checkpoint's ``hf/``."""
    root = Path(root)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp.{name}", root / name
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _state_dict(chunks, optimizer, teacher, is_loading=False, with_rng=True)
    state["common"] = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "trainer": trainer_state,
        "layout": _layout(),
        "teacher_mode": teacher.cfg.mode,
    }
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if write_hf_files is not None:
            (tmp / HF_SUBDIR).mkdir()
            write_hf_files(tmp / HF_SUBDIR)
        _write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        atomic_write_text(root / LATEST, name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory itself, or the one a root's ``latest`` names; None if the root has none."""
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        return path
    latest = path / LATEST
    if not latest.exists():
        if any(path.glob(".tmp.step_*")) or any(path.glob("step_*")):
            raise CheckpointError(f"{path}: checkpoints present but no '{LATEST}' pointer (interrupted save?)")
        return None
    target = path / latest.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{latest} names {target.name}, which does not exist")
    return target


def verify(path: Path) -> None:
    """Every file the manifest lists exists with its recorded size."""
    manifest = path / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{path} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest} is damaged: {exc}") from exc
    for rel, size in files.items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"{path} is damaged: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path} is damaged: {rel} has {f.stat().st_size} bytes, expected {size}")


def _create_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """A fresh distributed optimizer has no Adam state yet, and its sharded_state_dict needs one to
    load into (Megatron fills it with a zero-gradient step; the loaded values then replace it)."""
    for opt in optimizer.chained_optimizers:
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_optimizer(optimizer: MegatronOptimizer, state: dict[str, Any]) -> None:
    """Two pitfalls of Megatron 0.16's DistributedOptimizer over torch AdamW (no Apex/TE):
    ``load_state_dict`` restores Adam's per-parameter ``step`` and then fails copying the
    fully_reshardable parameter state, which has no ``step``; and the restored ``step`` is ONE
    tensor shared by all parameters, which AdamW then increments once per parameter per step
    (wrong bias correction). Load the two parts separately and give each parameter its own step."""
    opt = optimizer.chained_optimizers[0] if len(optimizer.chained_optimizers) == 1 else None
    if not isinstance(opt, DistributedOptimizer) or state.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state)
        return
    rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    opt.load_state_dict(rest)
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    opt.load_parameter_state_from_fully_reshardable(state["param_state"])
    for p, step in steps.items():
        opt.optimizer.state[p]["step"] = step.clone()


def load_checkpoint(
    path: Path,
    chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    teacher: Teacher,
) -> dict[str, Any]:
    """Restore everything in place; return the common part (step, trainer state, layout)."""
    verify(path)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read common state: {exc}") from exc
    if common["teacher_mode"] != teacher.cfg.mode:
        raise CheckpointError(f"{path} was saved with teacher mode {common['teacher_mode']!r}, run uses {teacher.cfg.mode!r}")
    same_layout = common["layout"] == _layout()
    _create_optimizer_state(optimizer)
    state = _state_dict(chunks, optimizer, teacher, is_loading=True, with_rng=same_layout)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load: {exc}") from exc
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"])
    _load_optimizer(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    tensors = teacher.state_tensors()
    if tensors is not None:
        with torch.no_grad():
            for name, value in loaded["teacher"].items():
                target = state["teacher"][name].data
                if value.data_ptr() != target.data_ptr():  # torch_dist usually loads in place
                    target.copy_(value)
        teacher.after_load()
    if same_layout:
        _set_rng_state(loaded["rng"])
    return common
