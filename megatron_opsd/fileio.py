"""Files and directories that a reader sees whole or not at all, and the manifest that proves a
directory complete.

- :func:`atomic_write_text`: one file (temp file, fsync, rename).
- :func:`atomic_output_dir`: a directory written under a hidden sibling name and renamed into
  place when complete (collective under ``torch.distributed``: all ranks write into it).
- :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json`` lists every file of a
  directory with its size, written last; a directory without one, or with a file missing or of
  another size, is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be used: incomplete, damaged, or not what its config says."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a
    torn write (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def partial_dir(out: str | Path) -> Path:
    """Where :func:`atomic_output_dir` writes ``out`` until it is complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``out`` only when the block succeeds.

    Collective when ``torch.distributed`` is initialized: every rank writes into the same
    temporary directory; rank 0 prepares and renames it, with barriers around both.
    """
    out = Path(out).resolve()
    tmp = partial_dir(out)
    distributed = dist.is_available() and dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    yield tmp
    if distributed:
        dist.barrier()
    if rank0:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    if distributed:
        dist.barrier()


def write_manifest(directory: Path) -> None:
    """List every file under ``directory`` with its size in ``manifest.json`` (write it last)."""
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / MANIFEST).write_text(json.dumps(files, indent=0))


def verify_manifest(directory: Path) -> None:
    """Every file the manifest lists exists with its recorded size."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest} is damaged: {exc}") from exc
    for rel, size in files.items():
        f = directory / rel
        if not f.exists():
            raise CheckpointError(f"{directory} is damaged: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{directory} is damaged: {rel} has {f.stat().st_size} bytes, expected {size}")
