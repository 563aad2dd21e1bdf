"""Seconds and GB/s of a weight sync of a ~1 GB model into two ``opsd serve`` stand-ins, by disk and
by broadcast (gloo), against the raw operations on the same bytes measured in the same run (goal:
each sync >= 0.5x its raw figure).

- disk: ``DiskSync.push`` (export to an HF directory, both servers ``/update_weights_from_disk``,
  flush, continue, version check) against a raw ``safetensors`` write of the same tensors plus one
  read of them into the model's tensors, measured in turns with the syncs (the same conditions:
  the servers beside it, this VM's page-out; the ratio is against this one) and, for reference,
  before the servers start (bench/RESULTS.md says why both). Every timed write starts with no
  dirty pages (``os.sync`` before it), so that none pays for the write-back of the one before;
- distributed: ``DistributedSync.push`` (bucketed gathers, HTTP calls and broadcasts, version
  check; its groups already connected) against raw gloo broadcasts of the same bytes in the same
  bucket sizes from this process to two receiver processes;
- with ``--vllm PYTHON`` (the interpreter of a vLLM environment: ``make vllm-env``), the syncs into
  two real vLLM servers too: by disk (pause, in-place reload, version, resume) against the same raw
  write + read measured in turns with it, and by vLLM's weight-transfer protocol over the servers'
  gloo backend (``VLLMTransferSync``: one tensor per broadcast) against the raw gloo broadcast.
Each figure is the median of ``--repeats``; the syncs' after one push more (the first touches the
servers' memory, or connects the groups). The sync times do not include the probe check that
follows each push (a forward pass, not a transfer).

    python bench/weight_sync.py [--hidden 1024] [--layers 16] [--vocab 32000] [--bucket-mb 256] [--repeats 5] [--dir DIR]
                                [--vllm .venv-vllm/bin/python]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from megatron_opsd.models import build_model
from megatron_opsd.models.bridge import model_hf_tensors
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.platform import free_port
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.engine import SGLangEngine
from megatron_opsd.rollout.sglang.fleet import Fleet
from megatron_opsd.rollout.sglang.weight_group import init_weight_group
from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
from megatron_opsd.rollout.sync.disk import DiskSync
from megatron_opsd.rollout.sync.distributed import DistributedSync
from megatron_opsd.rollout.sync.vllm_transfer import VLLMTransferSync
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.engine import VLLMEngine, VLLMFleet

GB = 1e9
REPO = Path(__file__).resolve().parents[1]


def receive(port: int, rank: int, sizes: list[int], repeats: int) -> None:
    """A raw receiver: join the group, take one broadcast per bucket size, ``repeats`` times."""
    group = init_weight_group("gloo", "127.0.0.1", port, 3, rank, "raw")
    for _ in range(repeats):
        for size in sizes:
            dist.broadcast(torch.empty(size, dtype=torch.uint8), group_src=0, group=group)
    dist.destroy_process_group(group)


def raw_broadcast(buffers: list[torch.Tensor], repeats: int) -> float:
    """Median seconds to broadcast ``buffers`` from this process to two receiver processes (gloo)."""
    port = free_port("127.0.0.1")
    sizes = ",".join(str(b.numel()) for b in buffers)
    receivers = [subprocess.Popen([sys.executable, __file__, "--receive", str(port), str(rank), sizes, str(repeats)])
                 for rank in (1, 2)]
    group = init_weight_group("gloo", "127.0.0.1", port, 3, 0, "raw")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for buffer in buffers:
            dist.broadcast(buffer, group_src=0, group=group)
        seconds.append(time.perf_counter() - start)
    for r in receivers:
        r.wait(60)
    dist.destroy_process_group(group)
    return statistics.median(seconds)


def raw_disk(tensors: dict[str, torch.Tensor], path: Path) -> tuple[float, float]:
    """Seconds of a safetensors write of ``tensors`` plus a read back into them, as a server loads
    them; and of the write alone."""
    os.sync()
    start = time.perf_counter()
    save_file(tensors, path)
    written = time.perf_counter()
    for name, t in load_file(path).items():
        tensors[name].copy_(t)
    end = time.perf_counter()
    path.unlink()
    return end - start, written - start


def disk_syncs(engine, chunks, probe, root: Path, tensors: dict[str, torch.Tensor], write_files,
               repeats: int) -> tuple[list[dict[str, float]], list[tuple[float, float]]]:
    """``repeats`` disk syncs into ``engine`` (after one that touches the servers' memory), each after
    a raw write + read of the same tensors: their metrics, and the raw figures."""
    root.mkdir(exist_ok=True)
    disk = DiskSync(engine, chunks, probe, root / "weights", 1, write_files)
    disk.push(version=1)
    runs, raws = [], []
    for version in range(2, 2 + repeats):
        disk.old_versions.wait()  # a training step lies between two syncs: the old version is gone by then
        raws.append(raw_disk(tensors, root / "raw.safetensors"))
        os.sync()
        runs.append(disk.push(version=version))
    disk.close()
    return runs, raws


def median_sync(runs: list[dict[str, float]]) -> tuple[float, dict[str, float]]:
    """The median disk sync's seconds (export + load, without the probe) and its metrics."""
    total = lambda m: m["time/weight_sync_write"] + m["time/weight_sync_load"]
    metrics = sorted(runs, key=total)[len(runs) // 2]
    return total(metrics), metrics


def vllm_syncs(python: str, chunks, probe, root: Path, tensors: dict[str, torch.Tensor], hf_config,
               repeats: int) -> tuple[list[dict[str, float]], list[tuple[float, float]], float]:
    """The disk syncs into two real vLLM servers (their model directory with the repo's tokenizer),
    and the median seconds of their transfer syncs (after one that connects the group)."""
    model = root / "vllm_model"
    hf_config.save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "data" / "tokenizer" / name, model / name)
    cfg = VLLMEngineConfig.model_validate({
        "kind": "vllm", "servers": {"count": 2, "command": [python, "-m", "vllm.entrypoints.openai.api_server"],
                                    "args": ["--enforce-eager"], "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                                    "weight_transfer": "gloo"},
        "timeouts": {"startup_s": 600, "request_s": 600, "control_s": 600}})
    fleet = VLLMFleet(cfg, root / "vllm_logs", api_key="bench")
    try:
        fleet.start(str(model), version=0, load_format="dummy")
        engine = VLLMEngine(fleet, cfg, hf_config.vocab_size, run_id="bench")
        runs, raws = disk_syncs(engine, chunks, probe, root / "vllm", tensors, hf_config.save_pretrained, repeats)
        transfer = VLLMTransferSync(engine, chunks, probe, SyncConfig(kind="distributed"), root / "vllm_weights",
                                    hf_config.save_pretrained, "127.0.0.1", "gloo", 600)
        first = 2 + repeats
        transfer.push(version=first)  # connects the group
        seconds = [transfer.push(version=v) for v in range(first + 1, first + 1 + repeats)]
        if any(m["weight_sync/servers_restarted"] for m in seconds):
            raise RuntimeError(f"a vLLM transfer sync fell back to disk: {seconds}")
        return runs, raws, statistics.median(m["time/weight_sync"] for m in seconds)
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the files go (default: the system's temporary directory; "
                        "/dev/shm leaves the disk out)")
    parser.add_argument("--vllm", default=None, help="also the disk sync into two vLLM servers run by this interpreter")
    parser.add_argument("--receive", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        receive(int(args.receive[0]), int(args.receive[1]), [int(s) for s in args.receive[2].split(",")],
                int(args.receive[3]))
        return

    hf_config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                            head_dim=args.hidden // 16, tie_word_embeddings=False, max_position_embeddings=512,
                            architectures=["Qwen3ForCausalLM"], dtype=torch.float32)
    groups = initialize(Layout())
    chunks = build_model(hf_config, torch.float32, groups=groups)
    tensors = dict(model_hf_tensors(chunks))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        raws = [raw_disk(tensors, root / "raw.safetensors") for _ in range(args.repeats)]
        bucket_bytes = int(args.bucket_mb * 2**20)
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()])
        buffers = list(flat.split(bucket_bytes))
        raw_dist = raw_broadcast(buffers, args.repeats)
        del flat, buffers

        (root / "model").mkdir()
        hf_config.save_pretrained(root / "model")
        os.environ["OMP_NUM_THREADS"] = "1"
        cfg = SGLangEngineConfig.model_validate({
            "kind": "sglang", "servers": {"count": 2, "command": ["python", "-m", "megatron_opsd.cli", "serve"]},
            "timeouts": {"startup_s": 600, "request_s": 600, "control_s": 600}})
        fleet = Fleet(cfg, root / "logs", api_key="bench")
        fleet.start(str(root / "model"), version=0, load_format="dummy")
        engine = SGLangEngine(fleet, cfg, args.vocab, run_id="bench")
        probe = ProbeCheck(chunks, list(range(1, 65)), 1.0, 1e-3, args.vocab)
        try:
            disk_runs, raws_in_turn = disk_syncs(engine, chunks, probe, root, tensors, hf_config.save_pretrained,
                                                 args.repeats)
            broadcast = DistributedSync(engine, chunks, probe, SyncConfig(kind="distributed", bucket_mb=args.bucket_mb),
                                        root / "weights", hf_config.save_pretrained, "127.0.0.1", 600)
            first = 2 + args.repeats
            broadcast.push(version=first)  # connects the groups
            dist_s = statistics.median(broadcast.push(version=v)["time/weight_sync"]
                                       for v in range(first + 1, first + 1 + args.repeats))
        finally:
            engine.close()
        vllm = vllm_syncs(args.vllm, chunks, probe, root, tensors, hf_config, args.repeats) if args.vllm else None
    quiet_s, quiet_write = sorted(raws)[len(raws) // 2]
    raw_disk_s, raw_write = sorted(raws_in_turn)[len(raws_in_turn) // 2]
    disk_s, disk_metrics = median_sync(disk_runs)
    print(f"weight sync of {nbytes / GB:.2f} GB (Qwen3 hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, "
          f"fp32) into 2 stand-ins; buckets of {args.bucket_mb:g} MiB; files in {args.dir or tempfile.gettempdir()}; "
          f"medians of {args.repeats}")
    print(f"  raw safetensors write + read        {raw_disk_s:6.2f} s  {nbytes / GB / raw_disk_s:5.2f} GB/s "
          f"(write {raw_write:.2f} s), in turns with the syncs; before the servers started {quiet_s:.2f} s "
          f"(write {quiet_write:.2f} s)")
    print(f"  disk sync (export + 2 servers load) {disk_s:6.2f} s  {nbytes / GB / disk_s:5.2f} GB/s "
          f"(export {disk_metrics['time/weight_sync_write']:.2f} s, load {disk_metrics['time/weight_sync_load']:.2f} s)"
          f"  ratio {raw_disk_s / disk_s:.2f} (goal >= 0.5; {quiet_s / disk_s:.2f} against the quiet raw)")
    print(f"  raw gloo broadcast to 2 receivers   {raw_dist:6.2f} s  {nbytes / GB / raw_dist:5.2f} GB/s")
    print(f"  distributed sync (gloo)             {dist_s:6.2f} s  {nbytes / GB / dist_s:5.2f} GB/s"
          f"  ratio {raw_dist / dist_s:.2f} (goal >= 0.5)")
    if vllm is not None:
        vllm_s, vllm_metrics = median_sync(vllm[0])
        vllm_raw = sorted(vllm[1])[len(vllm[1]) // 2][0]
        print(f"  disk sync into 2 vLLM servers       {vllm_s:6.2f} s  {nbytes / GB / vllm_s:5.2f} GB/s "
              f"(export {vllm_metrics['time/weight_sync_write']:.2f} s, pause + reload + version + resume "
              f"{vllm_metrics['time/weight_sync_load']:.2f} s)  ratio {vllm_raw / vllm_s:.2f} against the raw in "
              f"turns with it ({vllm_raw:.2f} s)")
        print(f"  vLLM transfer sync (gloo)           {vllm[2]:6.2f} s  {nbytes / GB / vllm[2]:5.2f} GB/s"
              f"  ratio {raw_dist / vllm[2]:.2f} against the raw gloo broadcast")


if __name__ == "__main__":
    main()
