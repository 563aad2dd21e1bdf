"""Model-only Megatron dist checkpoints (``torch_dist``) that load at any TP/PP layout.

Layout of a checkpoint directory::

    <dir>/               dist-checkpoint files written by megatron.core.dist_checkpointing
    <dir>/hf/            config.json, generation config and tokenizer files of the source model

``hf/`` makes the directory self-describing: :func:`hf_config_dir` is what ``build_model`` takes.
A training checkpoint (``train/checkpoint.py``) has the same layout plus more state, and loads here
too (model tensors only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_opsd.fileio import (
    MANIFEST,
    CheckpointError,
    HashingWriter,
    atomic_output_dir,
    verify_manifest,
    write_manifest,
)
from megatron_opsd.models.bridge import load_hf_weights
from megatron_opsd.models.gpt import LlamaFamilyModel
from megatron_opsd.models.hf_io import copy_non_weight_files
from megatron_opsd.models.lora import LoraConfig, add_adapters, has_adapters, is_adapter_param

HF_SUBDIR = "hf"


def hf_config_dir(ckpt_dir: str | Path) -> Path:
    """``<ckpt_dir>/hf`` of a complete checkpoint (a training checkpoint's manifest must check out)."""
    _check_complete(Path(ckpt_dir))
    path = Path(ckpt_dir) / HF_SUBDIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-opsd model checkpoint: no {HF_SUBDIR}/config.json")
    return path


def _check_complete(ckpt_dir: Path) -> None:
    """A checkpoint with a manifest has every file it lists, of its size. (Contents are checked when a
    training run resumes: reading every file once more would double a model load's I/O.)"""
    if (ckpt_dir / MANIFEST).is_file():
        verify_manifest(ckpt_dir, part=None)


def use_fork_results_queue() -> None:
    """Give Megatron's checkpoint writer a results queue from a *fork* Manager.

    Megatron creates it lazily with a *spawn* Manager, whose server process re-imports the main
    module, torch and Megatron (seconds: bench/RESULTS.md, "conversion"). The server only relays write results
    and never touches tensors or CUDA, so forking it is safe; Megatron forks its writers anyway.
    Call before any ``dist_checkpointing.save``; a no-op if this Megatron has no such queue.
    """
    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """Let ``torch.save`` (Megatron's writers serialize every tensor with it) skip the zip CRC32.

    Computing it doubled the writers' CPU time (bench/RESULTS.md, "conversion") and nothing
    checks it: ``torch.load``, which dist checkpoints read through, ignores it (see
    ``torch.serialization.set_crc32_options``). The writer processes are forked inside, so they
    inherit the setting; the previous one is restored afterwards.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


@contextlib.contextmanager
def _hashing_writers() -> Iterator[None]:
    """Let Megatron's checkpoint writers checksum every file as they write it (``fileio.HashingWriter``:
    its digest lands beside the file, for the manifest), instead of the manifest reading it again.

    The writers open their files with the name ``open`` of ``filesystem_async``; a module-level
    ``open`` there shadows the builtin for exactly those calls. The writer processes are forked
    inside, so they inherit it. A Megatron that opens files otherwise writes no digests, and the
    manifest then reads the files (the same checksums, slower).
    """
    filesystem_async.open = HashingWriter
    try:
        yield
    finally:
        del filesystem_async.open


def save_sharded(state: ShardedStateDict, directory: Path, write_files: Callable[[Path], None] | None = None) -> None:
    """``dist_checkpointing.save`` of ``state`` into the empty ``directory`` (collective), then on
    rank 0 ``write_files(directory)`` and the manifest: every file with its size and checksum, last.

    The writers get a fork results queue, skip torch.save's CRC32 and checksum what they write.
    """
    # Megatron has no setting for any of the three (its writers' results queue, torch.save's CRC32,
    # the file object its writers write through): each is set around the save, and only there.
    use_fork_results_queue()
    with _without_crc32(), _hashing_writers():
        dist_checkpointing.save(state, str(directory))
    dist.barrier()  # every rank's files (and their digests) are there
    if dist.get_rank() == 0:
        if write_files is not None:
            write_files(directory)
        write_manifest(directory)


def _merge_in_place(sharded_state_dict: ShardedStateDict) -> ShardedStateDict:
    """Skip the re-assembly copy of tensor factories that loaded straight into their parameter.

    Megatron saves ``linear_fc1`` of SwiGLU MLPs as two halves (a ``ShardedTensorFactory`` whose
    build returns dim-0 views of the parameter); on load it reads into those views, then
    ``torch.cat``s them into a new tensor that ``load_state_dict`` copies back: two redundant
    copies of the MLP's input weights. When the loaded parts are exactly the parameter's dim-0
    chunks, the parameter already holds the merged result (merge is build's inverse), so return
    it; anything else goes to the factory's own merge.
    """
    for factory in nested_values(sharded_state_dict):
        if isinstance(factory, ShardedTensorFactory):
            factory.merge_fn = _reuse_if_loaded_in_place(factory.data, factory.merge_fn)
    return sharded_state_dict


def _reuse_if_loaded_in_place(data: torch.Tensor, merge_fn):
    def merge(parts):
        if isinstance(parts, list) and all(isinstance(p, torch.Tensor) for p in parts):
            views = data.chunk(len(parts))
            if len(views) == len(parts) and all(
                (p.data_ptr(), p.shape, p.stride()) == (v.data_ptr(), v.shape, v.stride())
                for p, v in zip(parts, views, strict=True)
            ):
                return data
        return merge_fn(parts)

    return merge


def save(
    chunks: list[LlamaFamilyModel], out_dir: str | Path, hf_files_from: str | Path, *, overwrite: bool = False
) -> Path:
    """Save the model (collective) to ``out_dir`` atomically, with the HF config/tokenizer files
    copied from ``hf_files_from`` (an HF directory or another checkpoint's ``hf/``)."""
    (chunk,) = chunks

    def hf_files(directory: Path) -> None:
        (directory / HF_SUBDIR).mkdir()
        copy_non_weight_files(Path(hf_files_from), directory / HF_SUBDIR)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_sharded(chunk.sharded_state_dict(), tmp, hf_files)  # wants an empty directory
    return Path(out_dir)


def load(chunks: list[LlamaFamilyModel], ckpt_dir: str | Path) -> None:
    """Load a model checkpoint saved at any TP/PP layout into this rank's chunks (collective).

    A training checkpoint (``train/checkpoint.py``) loads too: it must be complete (its manifest
    checks out), then only the model's tensors are read; the rest of its state is left out.
    """
    (chunk,) = chunks
    ckpt_dir = Path(ckpt_dir)
    _check_complete(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a Megatron dist checkpoint: no metadata.json")
    lora = read_lora_manifest(ckpt_dir)
    if lora is not None and not has_adapters(chunks):  # adapters only: the base comes from where the run took it
        cfg, base = lora
        if base is None:
            raise CheckpointError(f"{ckpt_dir} holds LoRA adapters over a randomly initialized base (model.config): "
                                  f"only its training run can rebuild that base")
        load_hf_weights(chunks, base)
        add_adapters(chunks, cfg, seed=0)
    request = _merge_in_place(chunk.sharded_state_dict())
    if lora is not None:
        request = {k: v for k, v in request.items() if is_adapter_param(k)}
    try:
        state = dist_checkpointing.load(request, str(ckpt_dir))
    except CheckpointException as exc:  # a BaseException: it would escape every `except Exception`
        raise CheckpointError(f"{ckpt_dir}: cannot load the model (was it written for another one?): "
                              f"{load_failure(exc)}") from exc
    chunk.load_state_dict({key: state[key] for key in request}, strict=lora is None)


LORA_MANIFEST = "lora.json"  # in a checkpoint of LoRA adapters only: their config and the base model


def write_lora_manifest(directory: Path, cfg: LoraConfig, base: str | None) -> None:
    (directory / LORA_MANIFEST).write_text(json.dumps({"lora": cfg.model_dump(), "base": base}, indent=1) + "\n")


def read_lora_manifest(directory: Path) -> tuple[LoraConfig, str | None] | None:
    path = directory / LORA_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return LoraConfig.model_validate(manifest["lora"]), manifest["base"]


class Stateful(Protocol):
    """A named part of a training checkpoint whose state is plain values, the same on every rank
    (torch's convention: a scheduler, a data iterator, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedStateful(Protocol):
    """A named part of a training checkpoint with tensors sharded over the ranks (Megatron's
    convention: ShardedTensor / ShardedObject leaves, saved once per shard and resharded on load,
    beside plain values saved once)."""

    def sharded_state_dict(self, is_loading: bool = False) -> ShardedStateDict:
        """The state to save, or (``is_loading``) the request to load into."""

    def load_state_dict(self, state: ShardedStateDict) -> None:
        """Restore from the loaded request."""


def load_failure(exc: BaseException) -> str:
    """What went wrong in a failed dist-checkpoint load, in one line: torch's CheckpointException
    prints every rank's whole traceback; here each rank's exception only."""
    if isinstance(exc, CheckpointException):
        return "; ".join(f"rank {rank}: {type(error).__name__}: {error}" for rank, (error, _) in exc.failures.items())
    return f"{type(exc).__name__}: {exc}"


def shadow_sharded_state_dict(chunks: Sequence[torch.nn.Module], params: Sequence[torch.Tensor],
                              tensors: Sequence[torch.Tensor], prefix: str) -> ShardedStateDict:
    """The chunks' sharded state dict entries of ``params`` re-pointed at ``tensors`` (one per
    parameter, same shapes), every key prefixed with ``prefix``: a second set of weights (a
    teacher, an average; of every parameter or of the LoRA adapters) that is saved and resharded
    exactly like the model's own."""
    if len(params) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {len(params)} parameters")
    by_param = {id(p): t for p, t in zip(params, tensors)}
    out = {}
    for i, chunk in enumerate(chunks):
        for name, sh in unwrap_model(chunk).sharded_state_dict().items():
            if id(getattr(sh, "data", None)) in by_param:
                tensor = by_param[id(sh.data)]
                dtype = {"dtype": tensor.dtype} if hasattr(sh, "dtype") else {}  # e.g. an fp32 average of bf16 weights
                out[f"model{i}.{name}"] = dataclasses.replace(sh, key=f"{prefix}{sh.key}", data=tensor, **dtype)
    if len(out) != len(tensors):
        raise CheckpointError(f"{prefix!r} checkpoint covers {len(out)} of {len(tensors)} parameters")
    return out


__all__ = [
    "HF_SUBDIR",
    "LORA_MANIFEST",
    "ShardedStateful",
    "Stateful",
    "hf_config_dir",
    "load",
    "load_failure",
    "read_lora_manifest",
    "save",
    "save_sharded",
    "shadow_sharded_state_dict",
    "use_fork_results_queue",
    "write_lora_manifest",
]
