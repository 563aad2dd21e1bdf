"""``opsd compare RUN_DIR... [--out PREFIX] [--metric NAME]``: held-out accuracy of runs side by side.

The paper's token-efficiency comparison, from the runs' own files: each run directory's
``config.yaml`` (its algorithm) and ``metrics.jsonl`` (its evaluations, and the tokens its rollouts
generated at each step, ``rollout/generated_tokens``). Accuracy is drawn against step and against
cumulative generated tokens (those sampled for training through that step; evaluation's are not
counted, SFT generates none), and the table names, per run, its best accuracy and the tokens spent
to reach it (the first step at which it was reached). Writes ``PREFIX.md`` (the table),
``PREFIX.png`` and ``PREFIX.json``, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from megatron_opsd.errors import UserError
from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.tracking import CONFIG_FILE, METRICS_FILE, read_metrics

TOKENS = "rollout/generated_tokens"


class CompareError(UserError, ValueError):
    """A run directory that cannot be compared: names the directory and what it lacks."""


@dataclass(frozen=True)
class Point:
    step: int
    generated_tokens: int  # cumulative, through this step
    accuracy: float


@dataclass(frozen=True)
class RunCurve:
    label: str
    algorithm: str
    run_dir: str
    points: tuple[Point, ...]
    steps: int  # the last step logged
    generated_tokens: int  # through the last step logged

    @property
    def best(self) -> Point:
        """The highest accuracy, first reached (fewest steps and tokens)."""
        return max(self.points, key=lambda p: (p.accuracy, -p.step))


@dataclass(frozen=True)
class Comparison:
    metric: str
    runs: tuple[RunCurve, ...]


def _config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CompareError(f"{run_dir}: no {CONFIG_FILE} (is it the run_dir of an opsd train run?)")
    return yaml.safe_load(path.read_text())


def _default_metric(config: dict) -> str:
    return f"eval/avg@{config['eval']['k']}"


def read_run(run_dir: Path, metric: str | None = None, label: str | None = None) -> RunCurve:
    """One run's accuracy curve: ``metric`` at every evaluated step, with the generated tokens through it."""
    config = _config(run_dir)
    metric = metric or _default_metric(config)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise CompareError(f"{run_dir}: no {METRICS_FILE}")
    try:
        records = sorted(read_metrics(path), key=lambda r: r["step"])
    except ValueError as exc:
        raise CompareError(str(exc)) from exc
    algorithm = config["algorithm"]["name"]
    if algorithm != "sft" and not any(TOKENS in r for r in records if r["step"] > 0):
        raise CompareError(f"{path}: a {algorithm} run that logs no {TOKENS} (written by an older megatron-opsd?)")
    points, tokens = [], 0
    for record in records:
        generated = record.get(TOKENS, 0)
        if isinstance(generated, float) and math.isnan(generated):
            raise CompareError(f"{path}: step {record['step']}: {TOKENS} is not a number")
        tokens += int(generated)
        accuracy = record.get(metric)
        if isinstance(accuracy, int | float) and not math.isnan(accuracy):
            points.append(Point(record["step"], tokens, float(accuracy)))
    if not points:
        logged = sorted({k for r in records for k in r if k.startswith("eval/")})
        raise CompareError(f"{path}: no {metric} logged (evaluated: {logged or 'nothing; is eval.data set?'})")
    return RunCurve(label or run_dir.name, algorithm, str(run_dir), tuple(points), records[-1]["step"], tokens)


def compare_runs(run_dirs: list[Path], metric: str | None = None, labels: list[str] | None = None) -> Comparison:
    """The runs' curves of one metric (default: the first run's ``eval/avg@k``). Labels default to the
    run directories' names, made unique by their parents' where they clash."""
    if not run_dirs:
        raise CompareError("no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise CompareError(f"{len(labels)} labels for {len(run_dirs)} runs")
    metric = metric or _default_metric(_config(run_dirs[0]))
    if labels is None:
        names = [d.name for d in run_dirs]
        labels = [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]
    return Comparison(metric, tuple(read_run(d, metric, label) for d, label in zip(run_dirs, labels)))


def table(comparison: Comparison) -> str:
    """The Markdown table: per run its best accuracy, when and after how many generated tokens, and its last."""
    name = comparison.metric.removeprefix("eval/")
    header = (f"| run | algorithm | best {name} | at step | generated tokens to best | last {name} (step) "
              f"| generated tokens, all steps |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for run in comparison.runs:
        best, last = run.best, run.points[-1]
        lines.append(f"| {run.label} | {run.algorithm} | {best.accuracy:.1%} | {best.step} | {best.generated_tokens:,} "
                     f"| {last.accuracy:.1%} ({last.step}) | {run.generated_tokens:,} |")
    return "\n".join(lines)


def plot(comparison: Comparison, out: Path, title: str | None = None) -> None:
    """Accuracy against step (left) and against cumulative generated tokens (right), one line per run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

    fig = Figure(figsize=(11, 4), layout="constrained")
    by_step, by_tokens = fig.subplots(1, 2, sharey=True)
    for run in comparison.runs:
        steps = [p.step for p in run.points]
        accuracy = [p.accuracy for p in run.points]
        name = run.label if run.label == run.algorithm else f"{run.label} ({run.algorithm})"
        line, = by_step.plot(steps, accuracy, marker="o", label=name)
        label = f"{name}: generates no tokens" if run.generated_tokens == 0 else name
        by_tokens.plot([p.generated_tokens for p in run.points], accuracy, marker="o", color=line.get_color(),
                       label=label)
    by_step.set_xlabel("step")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_step.set_ylabel(f"held-out {comparison.metric.removeprefix('eval/')}")
    by_step.yaxis.set_major_formatter(PercentFormatter(1.0))
    by_tokens.set_xlabel("cumulative generated tokens (training rollouts)")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=100)


def write_comparison(comparison: Comparison, md: Path, png: Path, title: str | None = None) -> str:
    """Write the table (``md``, and the curves as JSON beside it) and the plot (``png``); return the table."""
    text = table(comparison)
    atomic_write_text(md, (f"# {title}\n\n" if title else "") + text + "\n")
    atomic_write_text(md.with_suffix(".json"), json.dumps(asdict(comparison), indent=1))
    plot(comparison, png, title)
    return text


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="held-out accuracy of runs against step and generated tokens: table + PNG",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories of opsd train")
    p.add_argument("--out", type=Path, default=Path("compare"),
                   help="writes OUT.md, OUT.png and OUT.json (default: %(default)s)")
    p.add_argument("--metric", help="the metrics.jsonl key to compare (default: the first run's eval/avg@k)")
    p.add_argument("--labels", help="comma-separated names of the runs, in order (default: their directory names)")
    p.add_argument("--title", help="title of the table and the figure")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    comparison = compare_runs(args.run_dirs, args.metric, labels)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    text = write_comparison(comparison, out.with_suffix(".md"), out.with_suffix(".png"), args.title)
    print(text)
    print(f"compare: {out.with_suffix('.md')}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
    return 0
