"""``rollout.sync.kind: disk``: each version as a Hugging Face directory on a path the servers
share, loaded by every server (SGLang's ``/update_weights_from_disk``, vLLM's in-place reload).

Per push: the exporter writes ``dir/step_<version>`` (collective; the directory appears only when
complete, so a server never reads half a version) -> rank 0 has every server pause (abort mode:
nothing in flight), load it with its ``weight_version``, flush and continue, restarting from it
any server that fails -> all servers' versions are checked -> the probe check, while versions
beyond ``keep_last`` are deleted in the background. The newest directory is also what a dead
server restarts from.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

from megatron_opsd.models.bridge import write_hf_model
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.rollout.remote.engine import RemoteEngine
from megatron_opsd.rollout.sync.base import ProbeCheck


def version_dir(root: Path, version: int) -> Path:
    return root / f"step_{version:06d}"


def export_version(chunks: Sequence[torch.nn.Module], root: Path, version: int,
                   write_files: Callable[[Path], None]) -> Path:
    """Write ``version`` of the weights under ``root`` (collective); its directory."""
    return write_hf_model(list(chunks), version_dir(root, version), write_files, overwrite=True)


def keep_newest(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` version directories under ``root``."""
    versions = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in versions[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


class OldVersions:
    """Deletes the version directories beyond the newest ``keep_last`` under ``root`` in a thread,
    while the servers already serve the new one: deleting a model-sized file takes a while (on a
    shared file system more so) and nothing needs to wait for it. One deletion at a time."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last
        self._thread: threading.Thread | None = None

    def retire(self) -> None:
        """Start deleting what is beyond the newest ``keep_last`` now (after the previous deletion)."""
        self.wait()
        self._thread = threading.Thread(target=keep_newest, args=(self.root, self.keep_last), name="old-weights")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class DiskSync:
    """Every server loads each version from ``root`` (``engine``: rank 0's, None elsewhere)."""

    def __init__(self, engine: RemoteEngine | None, chunks: Sequence[torch.nn.Module], probe: ProbeCheck,
                 root: Path, keep_last: int, write_files: Callable[[Path], None]):
        self.engine, self.chunks, self.probe = engine, [unwrap_model(c) for c in chunks], probe
        self.root, self.write_files = root, write_files
        self.old_versions = OldVersions(root, keep_last)

    def push(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        written, restarted = self.deliver(version)
        seconds = time.perf_counter() - start
        return {"time/weight_sync": seconds, "time/weight_sync_write": written,
                "time/weight_sync_load": seconds - written, "weight_sync/servers_restarted": float(restarted),
                "probe/logprob_abs_diff_max": self.probe(self.engine, version)}

    def deliver(self, version: int, poisoned: Iterable[int] = ()) -> tuple[float, int]:
        """Write ``version`` and have every server load it, those in ``poisoned`` (rank 0's: servers
        left with partial weights) restarted from it (collective); the seconds of the write, and
        how many servers were restarted. The probe check is the caller's."""
        start = time.perf_counter()
        path = export_version(self.chunks, self.root, version, self.write_files)
        written = time.perf_counter() - start

        def load() -> int:
            restarted = self.engine.load_from_disk(path, version, poisoned=poisoned)
            self.old_versions.retire()
            return len(restarted)

        return written, broadcast_from_rank0(load)

    def close(self) -> None:
        self.old_versions.wait()
