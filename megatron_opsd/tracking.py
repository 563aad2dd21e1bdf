"""Metrics sinks of a run: a JSONL file in the run directory, wandb, progress bars, and a PNG plot.

Named ``tracking`` rather than ``logging``: a package module called ``logging`` shadows the
standard library for any script started from inside the package directory
(``python megatron_opsd/cli.py`` puts that directory first on ``sys.path``, and then torch's and
transformers' own ``import logging`` would load this file), and it makes every ``import logging``
in the package ambiguous to a reader.

- ``metrics.jsonl``: one line per logged step, ``{"step": s, "time": unix_seconds, **metrics}``,
  flushed after every line so a crash loses nothing that was logged. A resumed run opens it with
  ``start_step`` (the first step it will log): lines of steps ``>= start_step`` and a torn last
  line are dropped, so the resumed run does not duplicate them. Non-finite values (NaN, inf) are
  written as ``null``, keeping the file strict JSON that every reader parses; they reach wandb as
  floats.
- wandb: ``offline`` unless configured otherwise (``mode``, ``WANDB_MODE``, or a ``project`` /
  ``entity``, which mean the user wants the run online). The run id is kept in the run directory so
  that a resumed run continues the same wandb run.
- ``metrics.png`` at :meth:`Tracker.close`: one panel per entry of ``TrackingConfig.plot``, each
  metric matching the panel's glob patterns against step.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TextIO, TypeVar

from pydantic import Field
from tqdm import tqdm

from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.section import Section

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"  # the resolved config of the run, written by the trainer (what `opsd compare` reads)
PLOT_FILE = "metrics.png"
WANDB_ID_FILE = "wandb_run_id"

T = TypeVar("T")


class TrackingConfig(Section):
    wandb: bool = Field(default=True, description="log to Weights & Biases (offline unless configured otherwise)")
    project: str | None = Field(default=None, description="wandb project; setting it (or entity) makes the run online")
    entity: str | None = Field(default=None, description="wandb entity (user or team)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="wandb mode; default: WANDB_MODE, else online if project/entity is set, else offline")
    name: str | None = Field(default=None, description="wandb run name; default: the run directory's name")
    group: str | None = Field(default=None, description="wandb group, e.g. one scaling sweep")
    tags: list[str] = Field(default_factory=list, description="wandb tags")
    progress: bool = Field(default=True, description="tqdm progress bars")
    plot: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "loss": ["loss"],
            "divergence": ["divergence", "divergence/*"],
            "eval accuracy": ["eval/avg@*", "eval/maj@*", "eval/pass@*"],
        },
        description="panels of metrics.png: title -> glob patterns of the metric names drawn in it; {}: no plot")

    def wandb_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if self.project or self.entity else "offline"


def _clean(key: str, value: Any) -> float | int | str | None:
    """A JSON-ready scalar: numpy / torch scalars unwrapped, non-finite floats as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r}: {type(value).__name__} is not a number or string")


def _read_records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """(raw line, record) per line, and how many lines were left out: a last line that does not
    parse (a write torn by a crash) is left out; any other line that is not a record is an error."""
    lines = [raw for raw in path.read_text().splitlines() if raw.strip()]
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((raw, record))
        elif n < len(lines) or record is not None:
            raise ValueError(f"{path}: line {n} is not a metrics record: {raw[:80]!r}")
    return out, len(lines) - len(out)


def truncate_metrics(path: Path, start_step: int) -> int:
    """Keep only the records of steps ``< start_step`` (rewritten atomically); returns how many lines were dropped."""
    records, torn = _read_records(path)
    kept = [raw for raw, record in records if record["step"] < start_step]
    dropped = len(records) + torn - len(kept)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, ``null`` values as NaN."""
    records, _ = _read_records(Path(path))
    return [{k: math.nan if v is None else v for k, v in r.items()} for _, r in records]


def plot_metrics(metrics_path: str | Path, out: str | Path, panels: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Draw each panel's matching numeric metrics against step into ``out`` (PNG); returns the
    metric names drawn per panel. A panel with nothing logged says so instead of staying blank."""
    # the Agg canvas, without pyplot's global state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    names = sorted({k for r in records for k, v in r.items() if k not in ("step", "time") and isinstance(v, int | float)})
    fig = Figure(figsize=(6.5, 2.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    drawn: dict[str, list[str]] = {}
    for ax, (title, patterns) in zip(axes, panels.items()):
        drawn[title] = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        for name in drawn[title]:
            points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), int | float)]
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn[title]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"not logged ({', '.join(patterns)})", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(out, dpi=100)
    return drawn


class Tracker:
    """The metrics sinks of one run. Create it on every rank with ``enabled`` true on exactly one
    (the rank that holds the metrics, e.g. global rank 0); elsewhere every method is a no-op.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, *, start_step: int = 0,
                 run_config: Mapping[str, Any] | None = None, enabled: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.last_step = start_step - 1
        self._file: TextIO | None = None
        self._wandb_run: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if path.exists():
            dropped = truncate_metrics(path, start_step)
            if dropped:
                log.info("%s: dropped %d line(s) of steps >= %d (resuming)", path, dropped, start_step)
        self._file = open(path, "a")  # noqa: SIM115 - appended to for the whole run; close() / __exit__ close it
        if cfg.wandb and cfg.wandb_mode() != "disabled":
            self._wandb_run = self._init_wandb(dict(run_config or {}))

    def _init_wandb(self, run_config: dict[str, Any]) -> Any:
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(6))  # wandb run ids: [a-z0-9]
        return wandb.init(
            project=self.cfg.project or "megatron-opsd", entity=self.cfg.entity, mode=self.cfg.wandb_mode(),
            dir=os.environ.get("WANDB_DIR", self.run_dir), id=id_file.read_text().strip(), resume="allow",
            name=self.cfg.name or self.run_dir.resolve().name, group=self.cfg.group, tags=self.cfg.tags,
            config=run_config, settings=wandb.Settings(quiet=True, console="off"))

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One record for ``step``; steps must increase (combine a step's metrics into one call)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("the tracker is closed")
        if step <= self.last_step:
            raise ValueError(f"metrics for step {step} after step {self.last_step}: steps must increase")
        clean = {k: _clean(k, v) for k, v in metrics.items()}
        if "step" in clean or "time" in clean:
            raise ValueError("'step' and 'time' are reserved metric names")
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: math.nan if v is None else v for k, v in clean.items()}, step=step)
        self.last_step = step

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterable[T]:
        """A tqdm bar when enabled here and ``cfg.progress``; the bare iterable otherwise."""
        if not (self.enabled and self.cfg.progress):
            return iterable
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)

    def close(self, plot: bool = True) -> Path | None:
        """Close the sinks; with ``plot``, draw ``metrics.png`` from the whole metrics file and return its path."""
        if not self.enabled or self._file is None:
            return None
        self._file.close()
        self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if not plot or not self.cfg.plot:
            return None
        out = self.run_dir / PLOT_FILE
        plot_metrics(self.metrics_path, out, self.cfg.plot)
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(plot=exc_type is None)
