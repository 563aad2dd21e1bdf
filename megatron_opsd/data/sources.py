"""Problem rows: where they come from, which fields hold what, and which rows are usable.

OPSD only has a signal if the teacher really sees a reference solution. A misnamed solution field
in another framework silently turned self-distillation into distillation from an identical
prompt, so here every row is checked when the data set is opened: a row whose problem or solution
is missing, empty or not text is an error naming the data set, the row and the field. Skipping
such rows is an explicit opt-in (``on_invalid_row: skip``) whose count is logged, and a field
that no row has, or a data set with no usable row, is an error even then.

Rows come from a hub name (clusters, e.g. the OpenThoughts math set) or a local jsonl / json /
parquet / arrow file, glob, or ``save_to_disk`` directory. JSON Lines files are read here, a
``json.loads`` per line (errors name the file and line); everything else through Hugging Face
``datasets``, imported only then (it brings pandas and pyarrow, more memory than a small run needs).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from megatron_opsd.errors import UserError
from megatron_opsd.section import Section

log = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class FieldMap(Section):
    """Where each field lives in a row: a column name or a dotted path into nested columns.

    Path parts that are integers index lists, e.g. ``messages.0.content``.
    """

    problem: str = Field(default="problem", description="column or dotted path of the problem text")
    solution: str | None = Field(
        default="solution",
        description="column or dotted path of the reference solution text; null if the data has none (evaluation and "
                    "GRPO read only answers; OPSD and SFT refuse it)")
    answer: str | None = Field(default="answer", description="final answer for grading; null if the data has none")


class DataConfig(Section):
    source: Literal["local", "hub"] = Field(
        default="local", description="local: a file or directory (data.path); hub: a Hugging Face data set (data.name)")
    path: str | None = Field(default=None, description="local file, glob or save_to_disk directory (source: local)")
    name: str | None = Field(default=None, description="hub data set name (source: hub)")
    subset: str | None = Field(default=None, description="hub data set configuration (source: hub)")
    split: str = Field(
        default="train", description="split of a hub data set or a save_to_disk DatasetDict (a single file is one split)")
    fields: FieldMap = FieldMap()
    on_invalid_row: Literal["error", "skip"] = Field(
        default="error", description="a row with a missing or empty problem/solution: error, or skip it (counted in the log)")
    shuffle: bool = Field(default=True, description="training: a new problem order every epoch; false: the source's order")
    seed: int = Field(default=1234, description="seed of the per-epoch shuffle")

    @model_validator(mode="after")
    def _one_location(self) -> DataConfig:
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs data.path")
        if self.source == "hub" and not self.name:
            raise ValueError("source 'hub' needs data.name")
        return self

    @property
    def label(self) -> str:
        """How error messages name the data set."""
        if self.source == "local":
            return f"{self.path} [{self.split}]"
        return f"{self.name}{'/' + self.subset if self.subset else ''} [{self.split}]"


class DataError(UserError, ValueError):
    """Unusable data: names the data set, and the row and field where it applies."""


@dataclass(frozen=True)
class Problem:
    """One usable row. ``index`` is the row's position in the source, kept for error messages."""

    index: int
    problem: str
    solution: str | None
    answer: str | None


@dataclass(frozen=True)
class ProblemSet:
    label: str
    problems: tuple[Problem, ...]
    num_rows: int
    num_skipped: int

    def __len__(self) -> int:
        return len(self.problems)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash: a resumed iterator refuses a data set that changed under it."""
        h = hashlib.blake2b(digest_size=16)
        for p in self.problems:
            for part in (str(p.index), p.problem, p.solution or "", p.answer or ""):
                h.update(part.encode())
                h.update(b"\0")
        return h.hexdigest()


MISSING = object()


def get_path(row: Mapping[str, Any], path: str) -> Any:
    """Value at a dotted path, or ``MISSING``; integer parts index lists."""
    node: Any = row
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node.get(part, MISSING)
        elif isinstance(node, Sequence) and not isinstance(node, str) and part.lstrip("-").isdigit():
            i = int(part)
            node = node[i] if -len(node) <= i < len(node) else MISSING
        else:
            return MISSING
        if node is MISSING:
            return MISSING
    return node


def _text_error(value: Any) -> str | None:
    if value is MISSING or value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not text (got {type(value).__name__})"
    if not value.strip():
        return "empty"
    return None


def _answer_text(value: Any) -> tuple[str | None, str | None]:
    """Answers may be numbers in the source (GSM8K-style); they are graded as text."""
    if value is MISSING or value is None:
        return None, "missing"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"not text or number (got {type(value).__name__})"
    text = str(value)
    return (text, None) if text.strip() else (None, "empty")


def _mapped_paths(fields: FieldMap) -> dict[str, str]:
    mapped = {"problem": fields.problem}
    if fields.solution is not None:
        mapped["solution"] = fields.solution
    if fields.answer is not None:
        mapped["answer"] = fields.answer
    return mapped


def _absent_fields(label: str, absent: list[str], mapped: dict[str, str], columns: Iterable[str]) -> DataError:
    hint = {"problem": "fix data.fields.problem", "answer": "fix data.fields.answer, or set it to null",
            "solution": "fix data.fields.solution: without it the teacher would see the student's prompt"}
    return DataError(
        f"{label}: no row has " + ", ".join(f"field {r!r} at path {mapped[r]!r}" for r in absent)
        + f"; columns are {sorted(columns)}. " + "; ".join(hint[r] for r in absent) + "."
    )


def extract_problems(rows: Iterable[Mapping[str, Any]], cfg: DataConfig, label: str | None = None) -> ProblemSet:
    """Validate rows and map them to ``Problem`` records (see the module docstring for the rules)."""
    label = label or cfg.label
    mapped = _mapped_paths(cfg.fields)
    problems: list[Problem] = []
    bad: list[str] = []
    present = dict.fromkeys(mapped, False)
    num_rows = 0
    for index, row in enumerate(rows):
        num_rows += 1
        values: dict[str, Any] = {}
        errors = []
        for role, path in mapped.items():
            raw = get_path(row, path)
            present[role] |= raw is not MISSING
            if role == "answer":
                values[role], why = _answer_text(raw)
            else:
                values[role], why = raw, _text_error(raw)
            if why:
                errors.append(f"{label}: row {index}: field {role!r} (path {path!r}) is {why}")
        if errors:
            bad.extend(errors)
            continue
        problems.append(Problem(index, values["problem"], values.get("solution"), values.get("answer")))

    absent = [role for role, seen in present.items() if not seen]
    if num_rows and absent:
        columns = rows.column_names if hasattr(rows, "column_names") else list(next(iter(rows), {}))
        raise _absent_fields(label, absent, mapped, columns)
    if bad and cfg.on_invalid_row == "error":
        shown = "\n  ".join(bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} invalid field(s) in {label} (set data.on_invalid_row: skip to drop such rows):\n  {shown}{more}")
    skipped = num_rows - len(problems)
    if skipped:
        log.warning("%s: skipped %d of %d rows with a missing, empty or non-text field (first: %s)",
                    label, skipped, num_rows, bad[0])
    if not problems:
        raise DataError(f"{label}: no usable rows ({num_rows} rows, {skipped} invalid)")
    return ProblemSet(label, tuple(problems), num_rows, skipped)


def open_rows(cfg: DataConfig) -> tuple[Sequence[Mapping[str, Any]], list[str]]:
    """The rows the config names and their column names."""
    path = Path(cfg.path) if cfg.source == "local" else None
    if path is not None and path.suffix == ".jsonl" and not path.is_dir():
        return _read_json_lines(cfg.path, _local_files(cfg.path))
    import datasets

    if path is None:
        rows = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split)
    elif path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        rows = loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        files = _local_files(cfg.path)
        try:
            rows = datasets.load_dataset(_LOCAL_BUILDERS[path.suffix], data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # datasets and pyarrow raise many types
            raise DataError(f"{cfg.path}: cannot read it: {exc}") from exc
    return rows, list(rows.column_names)


def _local_files(pattern: str) -> list[Path]:
    """The files a local path or glob names, checked for a known type and for content."""
    path = Path(pattern)
    if path.suffix not in _LOCAL_BUILDERS:
        raise DataError(
            f"{pattern}: unknown file type; expected one of {sorted(_LOCAL_BUILDERS)} or a save_to_disk directory")
    files = sorted(path.parent.glob(path.name))
    if not files:
        raise DataError(f"{pattern}: no such file")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{pattern}: empty file, no rows")
    return files


def _read_json_lines(label: str, files: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of JSON Lines files (blank lines skipped) and their keys in order of appearance; the
    first line that is not a JSON object is an error naming file and line."""
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f) as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{label}: {f} line {n} is not valid JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{label}: {f} line {n} is a JSON {type(row).__name__}, not an object (one row per line)")
                rows.append(row)
    if not rows:
        raise DataError(f"{label}: no rows (only blank lines)")
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def load_problems(cfg: DataConfig) -> ProblemSet:
    rows, columns = open_rows(cfg)
    if len(rows) == 0:
        raise DataError(f"{cfg.label}: no rows")
    mapped = _mapped_paths(cfg.fields)
    absent = [role for role, path in mapped.items() if path.split(".")[0] not in columns]
    if absent:
        raise _absent_fields(cfg.label, absent, mapped, columns)
    if hasattr(rows, "select_columns"):  # decode only the mapped columns: hub sets can carry long unrelated ones
        rows = rows.select_columns(sorted({p.split(".")[0] for p in mapped.values()}))
    return extract_problems(rows, cfg)


class ProblemIterator:
    """Endless, resumable stream of problems: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Data-parallel use: every rank builds the same iterator and draws the same global batch of
    prompts (so one state is checkpointed and resumes on any DP size); the rollouts are then split
    across DP ranks (``packing.split_for_data_parallel``).
    """

    def __init__(self, problems: ProblemSet, seed: int, shuffle: bool = True):
        self.problems = problems
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.problems)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[Problem]:
        return self

    def __next__(self) -> Problem:
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        item = self.problems.problems[self._order[self.position]]
        self.position += 1
        return item

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
            "num_problems": len(self.problems), "fingerprint": self.problems.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_problems", "fingerprint"):
            if state[key] != mine[key]:
                raise DataError(
                    f"{self.problems.label}: cannot resume the data iterator: {key} was {state[key]!r} "
                    f"at save time and is {mine[key]!r} now"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
