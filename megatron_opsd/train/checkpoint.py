"""Atomic, resumable, reshardable training checkpoints of named stateful parts (Megatron
dist_checkpointing, torch_dist).

A checkpoint holds whatever parts the run hands it, by name: the model, the optimizer (with its
step count), the LR scheduler, the data iterator, the step runner's counters, the RNG states,
and the algorithm's own parts (OPSD's teacher weights); SFT saves no teacher because it has
none. A part is either plain state the same on every rank (``state_dict`` / ``load_state_dict``,
saved once by rank 0) or sharded (``sharded_state_dict`` with Megatron ShardedTensor /
ShardedObject leaves); see ``models.checkpoint.Stateful`` and ``ShardedStateful``. A resume needs
exactly the parts that were saved: a checkpoint of another algorithm, or of an older layout of
this code (its common state has no ``checkpoint`` entry), is a CheckpointError naming what is
missing. Its model weights still load anywhere a model checkpoint does (``opsd eval``,
``opsd convert``).

Layout under the checkpoint root::

    step_000006/      a complete checkpoint (dist_checkpointing files + manifest.json)
    step_000006/hf/   the model's HF config (in the training dtype) and tokenizer files
    latest            the name of the newest complete checkpoint, written last

``hf/`` makes a step directory self-describing like a model checkpoint (``models/checkpoint.py``).

Atomicity: every rank writes into ``.step_000006.partial``; rank 0 writes the manifest (every
file and its size), renames the directory, then replaces ``latest``. A crash at any point leaves
either the previous ``latest`` or the new one, never a half checkpoint behind it. A damaged
checkpoint (missing/truncated file, no manifest) is a CheckpointError naming the file.

Resharding: sharded parts reshard to another TP/PP/DP layout (the optimizer as
``fully_reshardable``). Parts bound to their layout (``layout_bound = True``: the per-rank RNG
states) are restored only at the layout they were saved with.
"""
from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.utils import unwrap_model
from pydantic import Field
from torch.distributed.checkpoint.api import CheckpointException

from megatron_opsd.fileio import (
    MANIFEST,
    CheckpointError,
    atomic_output_dir,
    atomic_write_text,
    partial_dir,
    verify_manifest,
)
from megatron_opsd.models.checkpoint import (
    HF_SUBDIR,
    ShardedStateful,
    Stateful,
    load_failure,
    save_sharded,
    write_lora_manifest,
)
from megatron_opsd.models.lora import LoraConfig, has_adapters, is_adapter_param
from megatron_opsd.parallel import ParallelGroups
from megatron_opsd.section import Section
from megatron_opsd.train.optim import fuse_cpu_adam

log = logging.getLogger(__name__)

LATEST = "latest"
FORMAT = 2  # 1: the layout before named parts (model0 / optimizer / teacher / rng / common)
_META = "checkpoint"  # the checkpoint's own plain entry: format, step, layout, part names
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointConfig(Section):
    enabled: bool = Field(default=True, description="write checkpoints, and resume from the run's own latest one")
    dir: str | None = Field(
        default=None, description="checkpoint root (step_NNNNNN/ directories and 'latest'); default: run_dir/checkpoints")
    interval: int = Field(
        25, ge=1, description="steps between checkpoints (and the last step); a multiple of rollout.sync.interval")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    load: str | None = Field(
        default=None, description="start from this checkpoint directory or root when the run has no checkpoint of "
        "its own: a checkpoint of the same config is resumed, another run's is a warm start (its model weights)")
    stop_grace_s: float = Field(
        default=120.0, gt=0, description="after SIGTERM or Ctrl-C: seconds to reach the next step boundary and write "
        "its checkpoint; past them (or on a second signal) the run ends at once. Keep it below the scheduler's "
        "time between its SIGTERM and SIGKILL")
    stop_file: str | None = Field(
        default=None, description="a file whose appearance asks the run to stop as SIGTERM does (at the next phase "
        "boundary, with a checkpoint); the SLURM launcher's way to stop the trainer without relaying signals")


def _layout(groups: ParallelGroups) -> dict[str, int]:
    return {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size}


class ModelState:
    """The model chunks' parameters; with LoRA the adapters' only: the frozen base comes from
    ``model.hf`` (or the seed) as when the run started, the checkpoint's config names it."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        self.chunks = chunks
        self.adapters_only = has_adapters([unwrap_model(c) for c in chunks])

    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        return {f"model{i}": {k: v for k, v in unwrap_model(chunk).sharded_state_dict().items()
                              if not self.adapters_only or is_adapter_param(k)}
                for i, chunk in enumerate(self.chunks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, chunk in enumerate(self.chunks):
            missing, unexpected = unwrap_model(chunk).load_state_dict(state[f"model{i}"], strict=False)
            missing = [k for k in missing if not self.adapters_only or is_adapter_param(k)]
            if missing or unexpected:
                raise CheckpointError(f"model{i}: the checkpoint lacks {missing[:3]} and has unknown {unexpected[:3]}")


class OptimizerState:
    """The optimizer's state (moments, step counts), sharded like the parameters it belongs to."""

    def __init__(self, optimizer: MegatronOptimizer, chunks: Sequence[torch.nn.Module]):
        self.optimizer, self.model = optimizer, ModelState(chunks)

    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        if is_loading:
            _create_optimizer_state(self.optimizer)
        return self.optimizer.sharded_state_dict(self.model.sharded_state_dict(), is_loading=is_loading,
                                                 metadata=_OPTIM_METADATA)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_optimizer(self.optimizer, state)
        fuse_cpu_adam(self.optimizer)


class RNGState:
    """Python, numpy, torch (CPU and CUDA) and Megatron's tensor-parallel RNG states of this rank."""

    layout_bound = True

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def sharded_state_dict(self, is_loading: bool = False) -> ShardedObject:
        state = {
            "random": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
        layout, groups = _layout(self.groups), self.groups
        offset = (groups.pp_rank, groups.tp_rank, groups.dp_rank)
        return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), offset, replica_id=0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _part_state(part: Stateful | ShardedStateful, is_loading: bool) -> Any:
    return part.sharded_state_dict(is_loading=is_loading) if hasattr(part, "sharded_state_dict") else part.state_dict()


def save_checkpoint(
    root: str | Path,
    step: int,
    states: Mapping[str, Stateful | ShardedStateful],
    groups: ParallelGroups,
    keep_last: int,
    write_hf_files: Callable[[Path], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it with the same part names (the layout of ``groups`` is
    recorded). Plain parts must be identical on all ranks; they are stored once. ``write_hf_files(dir)`` (called on rank 0) writes the model's
    HF config and tokenizer into the checkpoint's ``hf/``; ``config`` (the run's, as plain values)
    is kept so that a resume can tell whose checkpoint it is (:func:`checkpoint_config`)."""
    root = Path(root)
    name = f"step_{step:06d}"
    tree = {key: _part_state(part, is_loading=False) for key, part in states.items()}
    tree[_META] = {"format": FORMAT, "step": step, "layout": _layout(groups), "parts": sorted(states),
                   "config": dict(config or {})}

    lora = (config or {}).get("model", {}).get("lora")

    def hf_files(directory: Path) -> None:
        if write_hf_files is not None:
            (directory / HF_SUBDIR).mkdir()
            write_hf_files(directory / HF_SUBDIR)
        if lora is not None:  # the model part holds the adapters only (ModelState)
            write_lora_manifest(directory, LoraConfig.model_validate(lora), config["model"].get("hf"))

    with atomic_output_dir(root / name, overwrite=True) as tmp:
        save_sharded(tree, tmp, hf_files)
    if dist.get_rank() == 0:
        atomic_write_text(root / LATEST, name)
        _prune(root, keep_last)
    dist.barrier()
    return root / name


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def verify_checkpoint(path: Path) -> None:
    """The checkpoint at ``path`` is complete and unchanged since its save (collective: the ranks
    share the checksumming, every rank raises the CheckpointError one of them found)."""
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (pruned by checkpoint.keep_last, or never written?)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        verify_manifest(path, part=(rank, world))
        problem = ""
    except CheckpointError as exc:
        problem = str(exc)
    problems = [problem] * world
    if world > 1:
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise CheckpointError(found[0])


def _candidates(root: Path) -> list[Path]:
    """The checkpoints under ``root``, the one ``latest`` names first, then newest to oldest."""
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / LATEST
    if not latest.exists():
        if steps or any(root.glob(partial_dir("step_*").name)):
            raise CheckpointError(f"{root}: checkpoints present but no '{LATEST}' pointer (interrupted save?)")
        return []
    name = latest.read_text().strip()
    if not name:
        raise CheckpointError(f"{latest} is empty (a save was interrupted while writing it); write the name of a "
                              f"step directory into it, e.g. {steps[0].name if steps else 'step_000100'}")
    if not (root / name).is_dir():
        raise CheckpointError(f"{latest} names {name}, which does not exist")
    return [root / name] + [p for p in steps if p.name != name]


def latest_intact(root: Path) -> Path | None:
    """The newest intact checkpoint under ``root`` (collective); a damaged one is skipped with a
    warning naming it and the one used instead. None when the root has no checkpoints; a
    CheckpointError when it has some but none is intact."""
    candidates = _candidates(root)
    damaged: list[str] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        if damaged:
            log.warning("skipping %d damaged checkpoint(s), resuming from %s instead: %s", len(damaged), path,
                        "; ".join(damaged))
        return path
    if damaged:
        raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(damaged))
    return None


def resolve(path: Path) -> Path | None:
    """A checkpoint directory (verified), or a root's newest intact checkpoint (collective)."""
    if path.name.startswith("step_") or (path / MANIFEST).exists():
        verify_checkpoint(path)
        return path
    return latest_intact(path)


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The config of the run that wrote the checkpoint (as plain values)."""
    return _read_meta(path)["config"]


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


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read common state: {exc}") from exc
    meta = common.get(_META) if isinstance(common, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = sorted(common) if isinstance(common, dict) else type(common).__name__
        raise CheckpointError(
            f"{path} was written by an older layout of megatron-opsd (format {meta.get('format') if meta else 1}, "
            f"this code reads {FORMAT}): its common state has no {_META!r} entry of format {FORMAT} (it has "
            f"{found}). Its model weights still load (opsd eval, opsd convert megatron-to-hf, checkpoint.load of a "
            f"converted model); to resume training, start from those weights (model.hf)")
    return meta


def load_checkpoint(path: Path, states: Mapping[str, Stateful | ShardedStateful], groups: ParallelGroups) -> int:
    """Restore every part in place from the checkpoint at ``path`` (collective; verified by
    :func:`resolve`); return its step. Parts bound to the layout are restored only at the same one."""
    meta = _read_meta(path)
    if meta["parts"] != sorted(states):
        missing, extra = sorted(set(states) - set(meta["parts"])), sorted(set(meta["parts"]) - set(states))
        raise CheckpointError(
            f"{path} holds the parts {meta['parts']}; this run has {sorted(states)}"
            + (f" (missing from the checkpoint: {missing})" if missing else "")
            + (f" (not in this run: {extra})" if extra else "") + ": it was written by another algorithm or setup")
    same_layout = meta["layout"] == _layout(groups)
    restored = {k: p for k, p in states.items() if same_layout or not getattr(p, "layout_bound", False)}
    request = {key: _part_state(part, is_loading=True) for key, part in restored.items()}
    try:
        loaded = dist_checkpointing.load(request, str(path))
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot load (was it written for another model?): {load_failure(exc)}") from exc
    for key, part in restored.items():
        part.load_state_dict(loaded[key])
    return meta["step"]


class Checkpointer:
    """The run's checkpoints of ``states``: written every ``cfg.interval`` steps and at the last one
    (atomically under ``root``, ``keep_last`` kept; no ``root``: none), restored at the start.
    ``write_hf_files(dir)`` writes the model's HF config and tokenizer; ``config`` is the run's."""

    def __init__(self, cfg: CheckpointConfig, root: Path | None, states: Mapping[str, Stateful | ShardedStateful],
                 groups: ParallelGroups, write_hf_files: Callable[[Path], None], config: Mapping[str, Any],
                 last_step: int):
        self.cfg, self.root, self.states, self.groups = cfg, root, states, groups
        self.write_hf_files, self.config, self.last_step = write_hf_files, config, last_step

    def due(self, step: int) -> bool:
        return self.root is not None and (step % self.cfg.interval == 0 or step == self.last_step)

    def save(self, step: int, *, now: bool = False) -> bool:
        """Write step ``step``'s checkpoint when it is due (or ``now``, when the run stops); whether it did."""
        if self.root is None or not (now or self.due(step)):
            return False
        save_checkpoint(self.root, step, self.states, self.groups, self.cfg.keep_last,
                        write_hf_files=self.write_hf_files, config=self.config)
        return True

    def path(self, step: int) -> Path | None:
        return self.root / f"step_{step:06d}" if self.root is not None else None

    def load(self, path: Path) -> int:
        """Restore every part from ``path``; its step."""
        return load_checkpoint(path, self.states, self.groups)
