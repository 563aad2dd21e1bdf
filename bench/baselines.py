"""OPSD, SFT and GRPO from one warm-up, on two tasks, with the same budget: where each method wins.

    python bench/baselines.py [--run-dir runs/baselines] [--warmup-steps N ...] [key=value ...]

The config is the demo's (``examples/tiny_cpu.yaml``; overrides apply to every run). Under
``--run-dir``, through the real trainer, in this process:

1. ``warmup/``: the demo's SFT warm-up on ``data/arith`` (step-by-step reference solutions, half of
   the examples with the teacher's prompt), so the student writes step-by-step answers;
2. for each task, from that warm-up, the same steps x problems per step and the same optimizer:
   ``<task>/opsd`` (the teacher sees the task's reference solution), ``<task>/sft`` (trained on it)
   and ``grpo`` (``algorithm.grpo.n`` graded rollouts per problem; it reads only the answers, which
   both tasks share, so one run serves both); every run evaluated on the same held-out problems
   before its first step and every ``eval.interval`` steps;
3. ``opsd compare`` of each task's three runs: ``<task>.md`` / ``<task>.png`` under ``--run-dir``
   (accuracy against step and against cumulative generated tokens).

Tasks: ``arith`` (the references in the student's own style) and ``arith_terse`` (the same problems
with one-expression references, ``5 * 5 + 5 - 16 = \\boxed{14}``: privileged context in another
style than the student's answers). A stopped run resumes when started again with the same settings.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = {"arith": "data/arith/train.jsonl", "arith_terse": "data/arith_terse/train.jsonl"}


def main(argv: list[str] | None = None) -> int:
    from megatron_opsd.compare import compare_runs, write_comparison
    from megatron_opsd.config import load_config
    from megatron_opsd.demo import WarmUp, phase, register_warmup_options, with_algorithm
    from megatron_opsd.train.cli import quiet_megatron
    from megatron_opsd.train.config import TrainConfig
    from megatron_opsd.train.loop import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "tiny_cpu.yaml")
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "baselines")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of every run's config")
    register_warmup_options(ap)
    args = ap.parse_args(argv)

    quiet_megatron()
    start = time.perf_counter()
    base = load_config(TrainConfig, args.config, [*args.overrides, f"run_dir={args.run_dir}", "algorithm.name=opsd"])
    root = Path(base.run_dir)
    warm = WarmUp.from_args(args).run(base, root)
    evaluated = base.eval.model_copy(update={"at_start": True})
    for task, path in TASKS.items():
        data = base.data.model_copy(update={"path": str(REPO / path)})
        for name in ("opsd", "sft"):
            train(phase(base, root / task, name, model=warm, eval=evaluated, data=data,
                        algorithm=with_algorithm(base, name)))
    train(phase(base, root, "grpo", model=warm, eval=evaluated, algorithm=with_algorithm(base, "grpo")))
    for task in TASKS:
        runs = [root / task / "opsd", root / task / "sft", root / "grpo"]
        table = write_comparison(compare_runs(runs), root / f"{task}.md", root / f"{task}.png", title=task)
        print(f"\n## {task}\n\n{table}")
    print(f"baselines: {time.perf_counter() - start:.0f} s under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
