"""What a LoRA OPSD step holds against a full one, on the tiny CPU model (examples/tiny_cpu.yaml's
model, the paper's LoRA r 64 / alpha 128 on all seven projections), in one process.

Each run builds the product's components from the config, trains ``--steps`` steps (so that the
optimizer state exists), then counts the bytes of what a step keeps resident: the parameters, the
gradient buffers (Megatron DDP's), the optimizer's state (moments and any fp32 master copies) and
the teacher's weights, by walking those tensors; and the process's peak RSS after the steps.

    python bench/lora_memory.py [--steps 2] [--rank 64]
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opsd.config import load_config
from megatron_opsd.train.components import build_components
from megatron_opsd.train.config import TrainConfig
from megatron_opsd.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(lora: dict | None, steps: int, run_dir: Path) -> dict[str, float]:
    overrides = [f"run_dir={run_dir}", f"steps={steps}", "checkpoint.enabled=false", "eval.data=null",
                 "tracking.progress=false"]
    if lora:
        overrides.append(f"model.lora={{r: {lora['r']}, alpha: {lora['alpha']}}}")
    cfg = load_config(TrainConfig, REPO / "examples/tiny_cpu.yaml", overrides)
    components = build_components(cfg)
    Trainer(components).run()
    chunks = [unwrap_model(c) for c in components.chunks]
    params = [p for c in chunks for p in c.parameters()]
    grads = [b.grad_data for c in components.chunks for b in getattr(c, "buffers", [])]
    optimizer = components.runner.optimizer
    state = [t for s in optimizer.optimizer.state.values() for t in s.values()]
    masters = [p for g in getattr(optimizer, "fp32_from_float16_groups", []) for p in g]
    teacher = components.algorithm.teacher.weights or []
    return {"parameters": nbytes(params), "trained parameters": nbytes(p for p in params if p.requires_grad),
            "gradient buffers": nbytes(grads), "optimizer state": nbytes(state) + nbytes(masters),
            "teacher weights": nbytes(teacher),
            "peak RSS": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--which", choices=["full", "lora"], help="one run (each needs its own process for RSS)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_lora_memory"))
    args = parser.parse_args()
    if args.which is None:  # both, each in a process of its own (peak RSS is per process)
        import subprocess
        rows = {}
        for which in ("full", "lora"):
            done = subprocess.run([sys.executable, __file__, "--which", which, "--steps", str(args.steps), "--rank",
                                   str(args.rank), "--out", str(args.out)], capture_output=True, text=True, check=True)
            rows[which] = dict(line.split("\t") for line in done.stdout.splitlines() if "\t" in line)
        print(f"{'':22}{'full':>14}{'LoRA r' + str(args.rank):>14}{'LoRA / full':>13}")
        for key in rows["full"]:
            full, lora = float(rows["full"][key]), float(rows["lora"][key])
            print(f"{key:22}{full / 2**20:>11.2f} MiB{lora / 2**20:>11.2f} MiB{lora / full if full else 0:>13.3f}")
        return
    lora = {"r": args.rank, "alpha": 2.0 * args.rank} if args.which == "lora" else None
    for key, value in measure(lora, args.steps, args.out / args.which).items():
        print(f"{key}\t{value}")


if __name__ == "__main__":
    main()
