"""Model-only Megatron dist checkpoints (``torch_dist``) that load at any TP/PP layout.

Layout of a checkpoint directory::

    <dir>/               dist-checkpoint files written by megatron.core.dist_checkpointing
    <dir>/hf/            config.json, generation config and tokenizer files of the source model

``hf/`` makes the directory self-describing: :func:`hf_config_dir` is what ``build_model`` takes.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_opsd.models.gpt import OPSDGPTModel
from megatron_opsd.models.hf_io import atomic_output_dir, copy_non_weight_files

HF_SUBDIR = "hf"


def hf_config_dir(ckpt_dir: str | Path) -> Path:
    path = Path(ckpt_dir) / HF_SUBDIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-opsd model checkpoint: no {HF_SUBDIR}/config.json")
    return path


def use_fork_results_queue() -> None:
    """Give Megatron's checkpoint writer a results queue from a *fork* Manager.

    Megatron creates it lazily with a *spawn* Manager, whose server process re-imports the main
    module (torch, Megatron: ~4 s per process, measured). The server only relays write results
    and never touches tensors or CUDA, so forking it is safe; Megatron forks its writers anyway.
    Call before any ``dist_checkpointing.save``; a no-op if this Megatron has no such queue.
    """
    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save(
    chunks: list[OPSDGPTModel], out_dir: str | Path, hf_files_from: str | Path, *, overwrite: bool = False
) -> Path:
    """Save the model (collective) to ``out_dir`` atomically, with the HF config/tokenizer files
    copied from ``hf_files_from`` (an HF directory or another checkpoint's ``hf/``)."""
    (chunk,) = chunks
    use_fork_results_queue()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        dist_checkpointing.save(chunk.sharded_state_dict(), str(tmp))  # wants an empty directory
        if dist.get_rank() == 0:
            (tmp / HF_SUBDIR).mkdir()
            copy_non_weight_files(Path(hf_files_from), tmp / HF_SUBDIR)
    return Path(out_dir)


def load(chunks: list[OPSDGPTModel], ckpt_dir: str | Path) -> None:
    """Load a model checkpoint saved at any TP/PP layout into this rank's chunks (collective)."""
    (chunk,) = chunks
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a Megatron dist checkpoint: no metadata.json")
    state = dist_checkpointing.load(chunk.sharded_state_dict(), str(ckpt_dir))
    chunk.load_state_dict(state)


__all__ = ["HF_SUBDIR", "hf_config_dir", "load", "save", "use_fork_results_queue"]
