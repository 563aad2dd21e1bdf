"""Sample k responses per problem from a rollout engine and report Avg@k, pass@k and maj@k.

- Avg@k: mean accuracy over all k samples of all problems (the paper's headline metric).
- pass@k': the unbiased estimator 1 - C(n-c, k')/C(n, k') per problem (n samples, c correct),
  for k' <= n, averaged over problems; lower k' than n gives lower-variance numbers than
  sub-sampling would.
- maj@k: majority vote over the extracted answers of the k samples, answers grouped by
  math-verify equivalence; see :func:`majority_score` for ties and samples without an answer.

Defaults follow the paper's protocol: k=12, temperature 1.0, top_p 0.95, no top-k, up to 38,912
new tokens; thinking on is the prompt builder's ``eval_thinking`` (default true).
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from pydantic.fields import FieldInfo
from tqdm import tqdm

from megatron_opsd.data.prompts import PromptBuilder
from megatron_opsd.data.sources import Problem
from megatron_opsd.eval.grader import answers_match, extract_boxed, grade, parses
from megatron_opsd.fileio import atomic_write_text
from megatron_opsd.rollout.engine import RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)


def _eval_default(name: str, value: Any) -> Any:
    """A sampling field of the evaluation protocol: the schema's own, with another default."""
    return FieldInfo.merge_field_infos(SamplingConfig.model_fields[name], default=value)


class EvalConfig(SamplingConfig):
    """Sampling (the paper's evaluation protocol as defaults) and metrics of an evaluation."""

    temperature: float = _eval_default("temperature", 1.0)
    top_k: int = _eval_default("top_k", -1)
    max_new_tokens: int = _eval_default("max_new_tokens", 38912)
    k: int = Field(default=12, ge=1, description="samples per problem (Avg@k, maj@k)")
    pass_at: list[int] | None = Field(
        default=None, description="k' values for pass@k'; default: powers of two below k, and k")
    batch_size: int = Field(default=32, ge=1, description="problems per generate call")
    seed: int = Field(default=0, description="sampling seed (each batch of problems derives its own from it)")
    save_responses: bool = Field(default=True, description="keep every decoded response in the report")

    @model_validator(mode="after")
    def _check_pass_at(self) -> EvalConfig:
        bad = [j for j in self.pass_at or () if not 1 <= j <= self.k]
        if bad:
            raise ValueError(f"pass_at values {bad} must lie in [1, k={self.k}]")
        return self

    def pass_at_values(self) -> list[int]:
        if self.pass_at is not None:
            return sorted(set(self.pass_at))
        return sorted({2 ** i for i in range(self.k.bit_length()) if 2 ** i < self.k} | {self.k})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct of ``n`` samples: 1 - C(n-c, k) / C(n, k).

    Computed as a product of ratios, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
    (astronomically large) binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote(answers: Sequence[str | None]) -> list[tuple[str, int]]:
    """Group answers by equivalence; (first answer of each group, group size), in order of first appearance.

    Each answer joins the first earlier group whose first answer it matches (math-verify
    equivalence is not guaranteed transitive, so groups are anchored on their first member).
    ``None`` (no boxed answer) casts no vote.
    """
    groups: list[list[Any]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if answers_match(group[0], answer):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    return [(a, n) for a, n in groups]


def majority_score(answers: Sequence[str | None], reference: str) -> float:
    """maj@k credit of one problem: 1 if the most frequent answer is correct, 0 if not.

    Ties: m groups tied for the most votes, c of them correct, score c/m, the expected score of
    a uniformly random tie-break; so the result does not depend on the order of the samples.
    No sample with an answer: 0.
    """
    groups = vote(answers)
    if not groups:
        return 0.0
    top = max(n for _, n in groups)
    leaders = [a for a, n in groups if n == top]
    return sum(answers_match(reference, a) for a in leaders) / len(leaders)


def reference_of(problem: Problem) -> str:
    """The gold answer: the row's answer field, else the last ``\\boxed{}`` of its solution."""
    if problem.answer is not None:
        return problem.answer
    boxed = extract_boxed(problem.solution) if problem.solution is not None else None
    if boxed is None:
        raise ValueError(f"row {problem.index}: no answer field and no \\boxed{{}} in a solution; cannot grade")
    return boxed


def unparseable_references(problems: Sequence[Problem]) -> list[int]:
    """Rows whose gold answer math-verify cannot read (warned about, once per problem set): a
    prediction is then right only if it is the same string after normalization, so such rows grade
    wrong whatever is answered."""
    return list(_unparseable_rows(tuple(problems)))


@functools.lru_cache(maxsize=8)  # a run evaluates the same problems every eval.interval steps
def _unparseable_rows(problems: tuple[Problem, ...]) -> tuple[int, ...]:
    rows = []
    for problem in problems:
        try:
            reference = reference_of(problem)
        except ValueError:
            continue  # no gold answer at all: evaluate() refuses such a row by name; training needs none
        if not parses(reference):
            rows.append(problem.index)
    if rows:
        log.warning("%d gold answer(s) math-verify cannot parse, graded by string comparison only: rows %s%s",
                    len(rows), rows[:10], " ..." if len(rows) > 10 else "")
    return tuple(rows)


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence((seed, batch)).generate_state(1)[0])


def evaluate(
    engine: RolloutEngine,
    problems: Sequence[Problem],
    prompt_builder: PromptBuilder,
    cfg: EvalConfig,
    *,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``cfg.k`` responses per problem, grade them, and return (and write to ``out``) the report.

    The report holds the metrics (``avg@k``, ``pass@k'`` for each k', ``maj@k``), the rates of
    responses without a boxed answer and of truncated ones, the sampling settings, the engine's
    weight version, and per problem the answers, grades, finish reasons and lengths.
    """
    if not problems:
        raise ValueError("nothing to evaluate: no problems")
    references = [reference_of(p) for p in problems]
    unparseable = unparseable_references(problems)
    tokenizer = prompt_builder.tokenizer
    rows: list[dict[str, Any]] = []
    starts = range(0, len(problems), cfg.batch_size)
    for b, start in enumerate(tqdm(starts, desc="eval", unit="batch", disable=not progress)):
        chunk = problems[start:start + cfg.batch_size]
        sampling = cfg.params(tokenizer, n=cfg.k, seed=_batch_seed(cfg.seed, b))
        rollouts = engine.generate([prompt_builder.eval_ids(p) for p in chunk], sampling)
        if len(rollouts) != len(chunk) or any(len(s) != cfg.k for s in rollouts):
            raise RuntimeError(f"engine returned {[len(s) for s in rollouts]} rollouts for {len(chunk)} prompts, "
                               f"expected {cfg.k} each")
        for problem, reference, samples in zip(chunk, references[start:start + len(chunk)], rollouts):
            texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in samples]
            grades = [grade(t, reference) for t in texts]
            row = {
                "index": problem.index,
                "reference": reference,
                "answers": [g.answer for g in grades],
                "correct": [g.correct for g in grades],
                "maj": majority_score([g.answer for g in grades], reference),
                "finish_reasons": [r.finish_reason for r in samples],
                "response_tokens": [len(r.response_ids) for r in samples],
            }
            if cfg.save_responses:
                row["responses"] = texts
            rows.append(row)

    k = cfg.k
    metrics = {f"avg@{k}": float(np.mean([np.mean(r["correct"]) for r in rows]))}
    for j in cfg.pass_at_values():
        metrics[f"pass@{j}"] = float(np.mean([pass_at_k(k, sum(r["correct"]), j) for r in rows]))
    metrics[f"maj@{k}"] = float(np.mean([r["maj"] for r in rows]))
    samples = len(rows) * k
    report = {
        "metrics": metrics,
        "num_problems": len(rows),
        "k": k,
        "no_answer_rate": sum(a is None for r in rows for a in r["answers"]) / samples,
        "truncated_rate": sum(f == "length" for r in rows for f in r["finish_reasons"]) / samples,
        "mean_response_tokens": sum(sum(r["response_tokens"]) for r in rows) / samples,
        "unparseable_references": unparseable,
        "weight_version": engine.weight_version,
        "config": cfg.model_dump(),
        "problems": rows,
    }
    if out is not None:
        write_report(out, report)
    return report


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write a JSON report atomically: a reader never sees a half-written one."""
    atomic_write_text(path, json.dumps(report, indent=1))
