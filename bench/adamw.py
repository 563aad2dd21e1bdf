"""torch's AdamW implementations on CPU: time per step and peak memory, against the single-tensor loop.

    python bench/adamw.py [--steps 6] [--rounds 3]

Parameters shaped like bench/vs_trl.py's model (a [151,936, 256] tied embedding and 4 Qwen3 layers
of hidden 256: 42M fp32 parameters), random gradients. Each (implementation, round) runs in a fresh
process: ``--steps`` AdamW steps after building the parameters; time is the median step after the
first (which allocates the moments), peak the process's high-water mark above the RSS before the
first step (the moments, 320 MB, included). Implementations: ``single`` (what Megatron builds on CPU
without TE or Apex: torch's default there), ``foreach``, ``fused`` (what ``train/optim.py`` switches
to). Prints medians over rounds and each one's ratio to ``single``, plus the largest parameter
difference to ``single`` after the steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(151_936, 256)] + [(1536, 256), (256, 768), (512, 256), (256, 256), (256,), (256,)] * 4
KINDS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def run(kind: str, steps: int, out: Path) -> dict:
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **KINDS[kind])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    torch.save([p.detach() for p in params], out / f"{kind}.pt")
    return {"step_s": statistics.median(times[1:]), "peak_mb": peak_mb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # where a child leaves its parameters
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args.steps, args.out)))
        return 0
    with tempfile.TemporaryDirectory() as out:
        return compare(args.steps, args.rounds, Path(out))


def compare(steps: int, rounds: int, out: Path) -> int:
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:  # interleaved: the machine's speed drifts
            done = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(steps), "--out", str(out)],
                                  capture_output=True, text=True, check=True).stdout
            results[kind].append(json.loads(done.split("RESULT ", 1)[1]))
    import torch

    reference = torch.load(out / "single.pt")
    base = {key: statistics.median(r[key] for r in results["single"]) for key in ("step_s", "peak_mb")}
    for kind, runs in results.items():
        step, peak = (statistics.median(r[key] for r in runs) for key in ("step_s", "peak_mb"))
        diff = max(float((a - b).abs().max()) for a, b in zip(torch.load(out / f"{kind}.pt"), reference))
        print(f"{kind:8s} step {step:.3f} s (x{step / base['step_s']:.2f}), peak +{peak:.0f} MB "
              f"(x{peak / base['peak_mb']:.2f}), max |param - single| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
