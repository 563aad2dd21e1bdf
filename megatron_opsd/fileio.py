"""Files and directories that a reader sees whole or not at all, and the manifest that proves a
directory complete.

- :func:`atomic_write_text`: one file (temp file, fsync, rename).
- :func:`atomic_output_dir`: a directory written under a hidden sibling name and renamed into
  place when complete (collective under ``torch.distributed``: all ranks write into it).
- :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json`` lists every file of a
  directory with its size and checksum (xxh3-64), written last; a directory without one, or with a
  file missing, of another size or with other contents, is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

from megatron_opsd.errors import UserError

MANIFEST = "manifest.json"


class CheckpointError(UserError, ValueError):
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


DIGEST_SUFFIX = ".xxh3"  # a file's checksum, written beside it by HashingWriter, folded into the manifest


class HashingWriter(io.RawIOBase):
    """A binary file that hashes (xxh3-64) what is written to it; on close the digest goes to
    ``<name>.xxh3`` beside it, for :func:`write_manifest`. Checksums computed while writing cost no
    second read of the data. Writes must be sequential (no seeking back), as a streamed save's are."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        if mode != "wb":
            raise ValueError(f"HashingWriter writes binary files from scratch (mode 'wb'), not {mode!r}")
        self._file, self._hash, self._path = open(path, "wb"), xxhash.xxh3_64(), Path(path)  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # flushes
        self._file.close()
        self._path.with_name(self._path.name + DIGEST_SUFFIX).write_text(self._hash.hexdigest())


def _digest(path: Path) -> str:
    """The file's xxh3-64: from its sidecar when it was written by a HashingWriter (the sidecar is
    removed), else by reading it (small files: metadata, configs)."""
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    if sidecar.is_file():
        digest = sidecar.read_text().strip()
        sidecar.unlink()
        return digest
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """List every file under ``directory`` with its size and checksum in ``manifest.json`` (write it last)."""
    paths = [f for f in sorted(directory.rglob("*")) if f.is_file() and not f.name.endswith(DIGEST_SUFFIX)]
    files = {str(f.relative_to(directory)): {"size": f.stat().st_size, "xxh3_64": _digest(f)} for f in paths}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=0))


def manifest_files(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``{file: {"size", "xxh3_64"}}`` (older manifests hold sizes only)."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        listed = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest} is damaged: {exc}") from exc
    files = listed.get("files") if isinstance(listed, dict) and isinstance(listed.get("files"), dict) else listed
    return {rel: entry if isinstance(entry, dict) else {"size": entry} for rel, entry in files.items()}


def verify_manifest(directory: Path, part: tuple[int, int] | None = (0, 1)) -> None:
    """Every file the manifest lists exists with its recorded size and checksum. ``part=(i, n)``
    checksums only every n-th file from the i-th (sizes are checked for all), so that n ranks share
    the reading; ``part=None`` checks sizes only (no file is read)."""
    files = manifest_files(directory)
    for k, (rel, entry) in enumerate(sorted(files.items())):
        f = directory / rel
        if not f.exists():
            raise CheckpointError(f"{directory} is damaged: {rel} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"{directory} is damaged: {rel} has {f.stat().st_size} bytes, expected {entry['size']}")
        if part is not None and "xxh3_64" in entry and k % part[1] == part[0] and _digest(f) != entry["xxh3_64"]:
            raise CheckpointError(f"{directory} is damaged: {rel} does not match its checksum (its contents changed "
                                  f"after the save)")


def unreadable_safetensors(directory: Path) -> list[str]:
    """``file: why`` for each safetensors file in ``directory`` whose header cannot be read or that is
    shorter than its header says (a truncated download or copy)."""
    from safetensors import safe_open

    problems = []
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' errors do not name the file
            problems.append(f"{path}: {exc}")
    return problems
