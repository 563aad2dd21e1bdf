"""Checkpoint conversion throughput against raw safetensors I/O of the same bytes, in one run.

    python bench/conversion.py [--layers 16] [--workdir DIR]

Builds a random ~1 GB bf16 Llama-style checkpoint, then times
  raw:      read every tensor (safetensors) + write them all again (safetensors),
  hf->mg:   build the Megatron model, load the HF shards, save a dist checkpoint,
  mg->hf:   build the model, load the dist checkpoint, stream-export HF shards,
and prints conversion speed as a multiple of raw I/O speed (goal: >= 0.5x). Conversions run
in-process (no interpreter start-up), at TP=1, with the same calls as tools/convert_*.py
(including ``perform_initialization=False``: every weight is loaded right after the build).
Each line also gives the CPU seconds spent (this process and the checkpoint writers it forks),
which other jobs on a shared machine stretch less than the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from megatron_opsd.models import build_model, checkpoint
from megatron_opsd.models.architectures import parse_hf_config
from megatron_opsd.models.bridge import hf_shapes, load_hf_weights, write_hf_model
from megatron_opsd.models.hf_io import copy_non_weight_files, write_hf_shards
from megatron_opsd.parallel import Layout, ParallelGroups, initialize


def make_source(out: Path, layers: int) -> tuple[LlamaConfig, int]:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    out.mkdir(parents=True)
    config.save_pretrained(out)
    shapes = hf_shapes(parse_hf_config(config))
    g = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16)) for n, s in shapes.items())
    write_hf_shards(tensors, out, max_shard_bytes=256 * 2**20)
    return config, sum(f.stat().st_size for f in out.glob("*.safetensors"))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (Megatron's forked checkpoint writers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU time per named phase, one entry per repeat. CPU time shows the work done
    even when other jobs on a shared machine stretch the wall time."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), cpu_seconds()
        yield
        self.times[name].append(time.perf_counter() - start)
        self.cpu[name].append(cpu_seconds() - cpu)


def raw_io(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(f), dst / f.name)


def hf_to_megatron(config, src: Path, dst: Path, clock: Clock, groups: ParallelGroups) -> None:
    with clock("  hf->mg build model"):
        chunks = build_model(config, torch.bfloat16, perform_initialization=False, groups=groups)
    with clock("  hf->mg load HF shards"):
        load_hf_weights(chunks, src)
    with clock("  hf->mg save dist checkpoint"):
        checkpoint.save(chunks, dst, hf_files_from=src)


def megatron_to_hf(config, src: Path, dst: Path, clock: Clock, groups: ParallelGroups) -> None:
    with clock("  mg->hf build model"):
        chunks = build_model(config, torch.bfloat16, perform_initialization=False, groups=groups)
    with clock("  mg->hf load dist checkpoint"):
        checkpoint.load(chunks, src)
    with clock("  mg->hf export + write HF shards"):
        write_hf_model(chunks, dst, lambda tmp: copy_non_weight_files(checkpoint.hf_config_dir(src), tmp),
                       max_shard_bytes=256 * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    groups = initialize(Layout())
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    clock = Clock()
    try:
        config, nbytes = make_source(work / "hf", args.layers)
        for _ in range(args.repeats):  # interleaved, so that machine noise hits all three alike
            for out in ("raw", "mg", "hf2"):
                shutil.rmtree(work / out, ignore_errors=True)
            with clock("raw safetensors read+write"):
                raw_io(work / "hf", work / "raw")
            with clock("hf -> megatron"):
                hf_to_megatron(config, work / "hf", work / "mg", clock, groups)
            with clock("megatron -> hf"):
                megatron_to_hf(config, work / "mg", work / "hf2", clock, groups)
    finally:
        shutil.rmtree(work)
    gb = nbytes / 1e9
    best = {name: min(secs) for name, secs in clock.times.items()}
    raw = best["raw safetensors read+write"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"checkpoint: {gb:.2f} GB bf16, {args.layers} layers; best of {args.repeats} interleaved runs; load average {load}")
    order = ["raw safetensors read+write", "hf -> megatron", "megatron -> hf"]
    order[2:2] = [n for n in best if n.startswith("  hf->mg")]
    order += [n for n in best if n.startswith("  mg->hf")]
    for name in order:
        secs = best[name]
        ratio = f"  = {raw / secs:.2f}x raw I/O" if name in ("hf -> megatron", "megatron -> hf") else ""
        print(f"{name:<34} {secs:6.2f} s  ({gb / secs:5.2f} GB/s)  cpu {min(clock.cpu[name]):5.2f} s{ratio}")


if __name__ == "__main__":
    main()
