"""Student, teacher and eval prompts, rendered by the tokenizer's own chat template.

The student sees the problem only (thinking off by default: its prompt ends with the empty think
block); the teacher sees the problem and the privileged reference solution (thinking on). Templates
are ``str.format`` strings with the named fields ``{problem}`` and ``{solution}`` (literal braces
doubled: ``\\boxed{{}}``). A teacher template without ``{solution}`` or a student / eval template
with it is an error: either would silently remove OPSD's signal.

A rollout's response token ids follow both prompts as ids, never re-tokenized text
(``data/sample.py``), so the two response runs are identical by construction.
"""
from __future__ import annotations

import dataclasses
import logging
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from megatron_opsd.data.sources import Problem, ProblemSet
from megatron_opsd.errors import UserError
from megatron_opsd.section import Section

log = logging.getLogger(__name__)

_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class Templates:
    student: str
    teacher: str
    eval: str


# The paper's v3 templates (arXiv 2601.18734v3), word for word: the em dash and the blank lines count.
V3 = Templates(
    student="Problem: {problem}\n\n" + _INSTRUCTION,
    teacher=(
        "Problem: {problem}\n\n"
        "Here is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n\n"
        "After reading the reference solution above, make sure you truly understand the reasoning behind each "
        "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
        "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
        "afraid to backtrack or reconsider if something doesn't work out:\n\n" + _INSTRUCTION
    ),
    eval="{problem}\n\n" + _INSTRUCTION,
)

# v1 (arXiv 2601.18734v1, Figure 2): the prompts end in "Answer:". The figure is an image, so the
# line breaks here are our reading of it.
V1 = Templates(
    student="Problem: {problem}\n\nAnswer:",
    teacher=(
        "Problem: {problem}\n\nHere is a reference solution:\n{solution}\n\n"
        "After understanding the reference solution, please try to solve this problem using your own "
        "approach below:\n\nAnswer:"
    ),
    eval=V3.eval,
)

NAMED_TEMPLATES = {"v3": V3, "v1": V1}


class PromptError(UserError, ValueError):
    """A template that would break OPSD, or a prompt that does not fit its length limit."""


def check_template(text: str, role: Literal["student", "teacher", "eval"]) -> None:
    """Templates may use only ``{problem}`` (all roles) and ``{solution}`` (teacher only, required)."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise PromptError(f"{role} template: {exc} (write literal braces as {{{{ and }}}})") from None
    names = [f for f, _, _ in fields]
    for name, spec, conv in fields:
        if name not in ("problem", "solution") or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise PromptError(
                f"{role} template: unknown field {shown}; use {{problem}}"
                + (" and {solution}" if role == "teacher" else "") + " (write literal braces as {{ and }})"
            )
    if "problem" not in names:
        raise PromptError(f"{role} template has no {{problem}} field")
    if role == "teacher" and "solution" not in names:
        raise PromptError("teacher template has no {solution} field: the teacher would see no privileged solution")
    if role != "teacher" and "solution" in names:
        raise PromptError(f"{role} template contains {{solution}}: only the teacher may see the reference solution")


class PromptConfig(Section):
    template: Literal["v3", "v1", "custom"] = Field(
        default="v3", description="v3: the paper's prompts; v1: its first version's (ending in 'Answer:'); "
        "custom: student_template, teacher_template (and eval_template)")
    student_template: str | None = Field(default=None, description="template: custom only")
    teacher_template: str | None = Field(default=None, description="template: custom only")
    eval_template: str | None = Field(default=None, description="template: custom only; default is the v3 eval prompt")
    student_thinking: bool = Field(default=False, description="chat template's enable_thinking for the student prompt")
    teacher_thinking: bool = Field(default=True, description="chat template's enable_thinking for the teacher prompt")
    eval_thinking: bool = Field(default=True, description="chat template's enable_thinking for the eval prompt")
    teacher_think_opener: str = Field(
        default="", description="text appended after the teacher's assistant opener, e.g. '<think>\\n'")
    max_student_prompt_tokens: int = Field(
        default=1024, gt=0, description="a longer student prompt is an error (the problem is never trimmed)")
    max_teacher_prompt_tokens: int = Field(default=4096, gt=0, description="limit of the teacher prompt; see overlong_teacher")
    overlong_teacher: Literal["trim_solution", "error"] = Field(
        default="trim_solution", description="a teacher prompt over its limit: cut the reference solution's tail to "
        "fit (counted), or error")

    @model_validator(mode="after")
    def _check_templates(self) -> PromptConfig:
        given = {r: t for r, t in (("student", self.student_template), ("teacher", self.teacher_template),
                                   ("eval", self.eval_template)) if t is not None}
        if self.template != "custom":
            if given:
                raise ValueError(
                    f"{sorted(given)} template(s) given but template is {self.template!r}; set template: custom")
            return self
        for role in ("student", "teacher"):
            if role not in given:
                raise ValueError(f"template: custom needs {role}_template")
        for role, text in given.items():
            check_template(text, role)
        return self

    def templates(self) -> Templates:
        if self.template != "custom":
            return NAMED_TEMPLATES[self.template]
        return Templates(self.student_template, self.teacher_template, self.eval_template or V3.eval)


class PromptLengthError(PromptError):
    """A prompt over its token limit that the length policy may not shorten."""


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a local directory (nothing is downloaded); a missing or unreadable one
    is a PromptError naming the directory."""
    from transformers import AutoTokenizer  # slow to import: only when a tokenizer is needed

    if not Path(path).is_dir():
        raise PromptError(f"tokenizer {path}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PromptError(f"tokenizer {path}: cannot load it: {exc}") from exc


class PromptBuilder:
    """Renders and tokenizes prompts for any HF tokenizer with a chat template; applies the length policy.

    ``stats`` counts what the policy did (prompts built, solutions trimmed) for the trainer's metrics.
    """

    def __init__(self, tokenizer: Any, cfg: PromptConfig):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.templates = cfg.templates()
        self.stats: Counter[str] = Counter()

    def _chat(self, message: str, thinking: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking)

    def _encode(self, text: str) -> list[int]:
        # The chat template already carries any BOS; adding special tokens again would double it.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def student_text(self, problem: str) -> str:
        return self._chat(self.templates.student.format(problem=problem), self.cfg.student_thinking)

    def teacher_text(self, problem: str, solution: str) -> str:
        message = self.templates.teacher.format(problem=problem, solution=solution)
        return self._chat(message, self.cfg.teacher_thinking) + self.cfg.teacher_think_opener

    def eval_text(self, problem: str) -> str:
        return self._chat(self.templates.eval.format(problem=problem), self.cfg.eval_thinking)

    def student_ids(self, item: Problem) -> list[int]:
        ids = self._encode(self.student_text(item.problem))
        if len(ids) > self.cfg.max_student_prompt_tokens:
            raise PromptLengthError(
                f"row {item.index}: student prompt has {len(ids)} tokens > prompts.max_student_prompt_tokens="
                f"{self.cfg.max_student_prompt_tokens} (the problem itself is never trimmed)")
        return ids

    def eval_ids(self, item: Problem) -> list[int]:
        return self._encode(self.eval_text(item.problem))

    def teacher_ids(self, item: Problem) -> list[int]:
        """Teacher prompt ids; an over-long one loses the tail of the solution (never the problem) or errors."""
        limit = self.cfg.max_teacher_prompt_tokens
        ids = self._encode(self.teacher_text(item.problem, item.solution))
        self.stats["teacher_prompts"] += 1
        if len(ids) <= limit:
            return ids
        if self.cfg.overlong_teacher == "error":
            raise PromptLengthError(
                f"row {item.index}: teacher prompt has {len(ids)} tokens > prompts.max_teacher_prompt_tokens={limit}")
        solution_ids = self._encode(item.solution)

        def fits(k: int) -> list[int] | None:
            trial = self._encode(self.teacher_text(item.problem, self.tokenizer.decode(solution_ids[:k])))
            return trial if len(trial) <= limit else None

        lo, hi, best = 1, len(solution_ids) - 1, None  # longest solution prefix that fits
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = fits(mid)
            if trial is None:
                hi = mid - 1
            else:
                lo, best = mid + 1, trial
        if best is None:
            raise PromptLengthError(
                f"row {item.index}: teacher prompt exceeds prompts.max_teacher_prompt_tokens={limit} even with "
                f"the solution trimmed to one token; raise the limit or drop the row")
        self.stats["teacher_solution_trimmed"] += 1
        log.log(logging.WARNING if self.stats["teacher_solution_trimmed"] == 1 else logging.DEBUG,
                "row %d: reference solution trimmed to %d of %d tokens to fit prompts.max_teacher_prompt_tokens=%d "
                "(counted in stats['teacher_solution_trimmed'])", item.index, lo - 1, len(solution_ids), limit)
        return best

    def fitting(self, problems: ProblemSet, on_invalid_row: Literal["error", "skip"] = "error") -> ProblemSet:
        """``problems`` without the rows whose prompts can never fit their limits, checked when the data
        is loaded rather than when a row is drawn: a student prompt over its limit, or a teacher
        prompt over its limit even with no solution at all (or, with ``overlong_teacher: error``,
        with its solution). Such rows are an error naming the data set and rows, or with
        ``on_invalid_row: skip`` dropped and counted."""
        texts = [self.student_text(p.problem) for p in problems.problems]
        solutions = ["" if self.cfg.overlong_teacher == "trim_solution" else p.solution or "" for p in problems.problems]
        teacher = [self.teacher_text(p.problem, s) for p, s in zip(problems.problems, solutions)]
        lengths = self.tokenizer(texts + teacher, add_special_tokens=False)["input_ids"]
        student, teacher = lengths[:len(texts)], lengths[len(texts):]
        bad: dict[int, str] = {}  # row index -> why
        for p, s, t in zip(problems.problems, student, teacher):
            if len(s) > self.cfg.max_student_prompt_tokens:
                bad[p.index] = (f"row {p.index}: student prompt has {len(s)} tokens > prompts.max_student_prompt_tokens="
                                f"{self.cfg.max_student_prompt_tokens}")
            elif len(t) > self.cfg.max_teacher_prompt_tokens:
                what = "with its solution" if self.cfg.overlong_teacher == "error" else "without any solution"
                bad[p.index] = (f"row {p.index}: teacher prompt has {len(t)} tokens {what} > "
                                f"prompts.max_teacher_prompt_tokens={self.cfg.max_teacher_prompt_tokens}")
        if not bad:
            return problems
        reasons = list(bad.values())
        if on_invalid_row == "error":
            more = f"\n  ... and {len(reasons) - 20} more" if len(reasons) > 20 else ""
            raise PromptLengthError(f"{len(reasons)} row(s) of {problems.label} have prompts over their limits (raise "
                                    f"the limits, or set data.on_invalid_row: skip):\n  " + "\n  ".join(reasons[:20]) + more)
        kept = tuple(p for p in problems.problems if p.index not in bad)
        if not kept:
            raise PromptLengthError(f"{problems.label}: no row has prompts within their limits (first: {reasons[0]})")
        log.warning("%s: skipped %d row(s) whose prompts exceed their limits (first: %s)", problems.label, len(reasons),
                    reasons[0])
        return dataclasses.replace(problems, problems=kept, num_skipped=problems.num_skipped + len(reasons))
