"""Non-pad token fraction of the pair packer vs per-sample padding to the batch maximum.

    python bench/packing.py [--samples 32 256] [--seed 0]

Lengths mimic reasoning rollouts: student sequence (prompt + response) lognormal with median 1024
tokens, clipped to [32, 16384]; the teacher adds a reference solution, lognormal median 512,
clipped to [16, 4096]. Budgets: 16384 student / 20480 teacher tokens per micro-batch, padding to a
multiple of 16 (e.g. TP 8 with sequence parallelism x CP 2).

Reported, per number of samples in one rank's step:
- packed THD: non-pad / tokens actually run (micro-batch rows are variable length on GPU);
- packed fixed: non-pad / (micro-batches x budget), the worst case if every row were padded to the budget;
- padded bN: baseline micro-batches of N samples in rollout order, each padded to its longest sample.
Goal: >= 95% non-pad tokens for the packer.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opsd.data.packing import PackingConfig, assign_micro_batches, pack_samples, round_up
from megatron_opsd.data.sample import Sample

STUDENT_BUDGET, TEACHER_BUDGET, PAD_MULTIPLE = 16384, 20480, 16


def lengths(n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    student = np.clip(rng.lognormal(np.log(1024), 1.0, n), 32, 16384).astype(int)
    extra = np.clip(rng.lognormal(np.log(512), 0.8, n), 16, 4096).astype(int)
    return student.tolist(), (student + extra).tolist()


def padded_baseline(lens: list[int], batch: int) -> float:
    run = sum(max(lens[i:i + batch]) * len(lens[i:i + batch]) for i in range(0, len(lens), batch))
    return sum(lens) / run


def one(n: int, rng: np.random.Generator) -> dict[str, float]:
    student, teacher = lengths(n, rng)
    t0 = time.perf_counter()
    groups = assign_micro_batches(student, teacher, STUDENT_BUDGET, TEACHER_BUDGET)
    assign_s = time.perf_counter() - t0
    row = {"samples": n, "micro-batches": len(groups), "assign ms": 1e3 * assign_s}
    for side, lens, budget in (("student", student, STUDENT_BUDGET), ("teacher", teacher, TEACHER_BUDGET)):
        real = sum(lens)
        run = sum(round_up(sum(lens[i] for i in g), PAD_MULTIPLE) for g in groups)
        row[f"{side} packed THD"] = real / run
        row[f"{side} packed fixed"] = real / (len(groups) * budget)
        row[f"{side} padded b4"] = padded_baseline(lens, 4)
        row[f"{side} padded b8"] = padded_baseline(lens, 8)
    return row, student, teacher


def full_pack_ms(student: list[int], teacher: list[int]) -> float:
    """Wall time (ms) of ``pack_samples``, tensor building included, on synthetic samples with these lengths."""
    samples = []
    for s, t in zip(student, teacher):
        response = tuple(range(min(s - 1, 1024)))
        samples.append(Sample((7,) * (s - len(response)), response, teacher_prompt_ids=(9,) * (t - len(response))))
    cfg = PackingConfig(tokens_per_micro_batch=STUDENT_BUDGET, teacher_tokens_per_micro_batch=TEACHER_BUDGET)
    times = []
    for _ in range(4):  # the first call pays torch's one-time costs; the best of the rest is the steady state
        t0 = time.perf_counter()
        pack_samples(samples, cfg, pad_multiple=PAD_MULTIPLE)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"budgets {STUDENT_BUDGET}/{TEACHER_BUDGET} tokens (student/teacher), pad multiple {PAD_MULTIPLE}, seed {args.seed}")
    for n in args.samples:
        row, student, teacher = one(n, rng)
        print(f"\n{n} samples: student median {int(np.median(student))} / max {max(student)} tokens, "
              f"{row['micro-batches']} micro-batches, assignment {row['assign ms']:.1f} ms, "
              f"pack_samples {full_pack_ms(student, teacher):.0f} ms")
        print(f"  {'non-pad fraction':<18}{'student':>9}{'teacher':>9}")
        for kind in ("packed THD", "packed fixed", "padded b4", "padded b8"):
            print(f"  {kind:<18}{row['student ' + kind]:>9.1%}{row['teacher ' + kind]:>9.1%}")
        gain = [row[f"{side} packed THD"] / row[f"{side} padded b8"] for side in ("student", "teacher")]
        thd = min(row["student packed THD"], row["teacher packed THD"])
        print(f"  packed THD / padded b8: {gain[0]:.2f}x student, {gain[1]:.2f}x teacher; goal >= 95% non-pad: "
              f"{'met' if thd >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
