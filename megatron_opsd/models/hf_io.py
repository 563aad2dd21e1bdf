"""Hugging Face safetensors directories: validated lazy reading and streamed sharded writing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_opsd.fileio import CheckpointError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Derived buffers some older checkpoints carry; recomputed from the config, never loaded.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


class HFReader:
    """Lazy, validated access to the tensors of an HF safetensors directory.

    Construction checks the whole directory against the expected ``{name: shape}`` (headers only,
    no tensor data): shard files listed by the index exist, every expected tensor is present with
    its shape, nothing unexpected is there. All problems are reported at once, each naming the
    tensor and file.
    """

    def __init__(self, hf_dir: str | Path, expected: dict[str, tuple[int, ...]]):
        self.dir = Path(hf_dir)
        files = self._weight_map()
        problems: list[str] = []
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        skipped = 0
        missing_files = set()
        for file in sorted(set(files.values())):
            path = self.dir / file
            if not path.is_file():
                missing_files.add(file)
                listed = sorted(n for n, f in files.items() if f == file)
                problems.append(
                    f"missing shard file {path} (index lists {len(listed)} tensors in it, e.g. {listed[0]})"
                )
                continue
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
                problems.append(f"cannot read shard file {path}: {e}")
                continue
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
                if name.endswith(DERIVED_SUFFIXES):
                    skipped += 1
                    continue
                if files.get(name, file) != file:
                    problems.append(f"tensor {name} is in {path} but the index says {files[name]}")
                if name not in expected:
                    problems.append(f"unexpected tensor {name} in {path}")
                    continue
                if name in self.file_of:
                    problems.append(f"tensor {name} is in both {self.dir / self.file_of[name]} and {path}")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    problems.append(
                        f"tensor {name} in {path} has shape {list(shape)}, config expects {list(expected[name])}"
                    )
                self.file_of[name] = file
        for name in expected:
            if name not in self.file_of and files.get(name) not in missing_files:
                where = self.dir / files[name] if name in files else f"any shard file of {self.dir}"
                problems.append(f"missing tensor {name} (not found in {where})")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"checkpoint {self.dir} does not match its config:\n  {shown}{more}")
        if skipped:
            log.info("skipped %d derived rotary_emb.inv_freq tensors in %s", skipped, self.dir)

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        if (self.dir / SINGLE).is_file():
            with safe_open(str(self.dir / SINGLE), framework="pt") as f:
                return {name: SINGLE for name in f.keys()}  # noqa: SIM118 - safe_open has keys() but is not iterable
        raise CheckpointError(f"no {INDEX} or {SINGLE} in {self.dir}")

    def slice(self, name: str):
        """A lazily read view: index it (``[a:b]``, ``[:, a:b]``) to read only those bytes."""
        return self._handles[self.file_of[name]].get_slice(name)

    def path(self, name: str) -> Path:
        return self.dir / self.file_of[name]


def write_hf_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write (name, tensor) pairs as ``model-0000i-of-0000n.safetensors`` + index, holding at most
    one shard in memory. A single shard is still indexed, which transformers accepts."""
    shards: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        tmp_name = f"shard-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(out_dir / tmp_name), metadata={"format": "pt"})
        shards.append((tmp_name, list(pending)))
        pending, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    if pending or not shards:
        flush()
    weight_map = {}
    for i, (tmp_name, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (everything but weights and index)."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_FILE_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
