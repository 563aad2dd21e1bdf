"""Grade a response against a reference answer: the last ``\\boxed{...}``, compared with math-verify.

Rules (the paper's protocol):
- the answer is the content of the LAST complete ``\\boxed{...}`` (nested braces allowed); a
  response without one is wrong, whatever else it says. An unclosed box (a truncated response)
  does not count, so the last closed box before it is the answer.
- both sides are given to math-verify as inline LaTeX (``$...$``): a bare LaTeX string such as
  ``(x+1)^2`` parses to nothing otherwise, while plain numbers parse either way.
- identical answers after light string normalization are correct before any parsing (this catches
  answers math-verify cannot parse, e.g. ``\\text{(B)}`` vs ``(B)``, and costs nothing).

math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the main
thread; elsewhere the grader runs without those time limits instead of failing.
"""
from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

from math_verify import parse, verify

_BOX = re.compile(r"\\boxed\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\s+")


@dataclass(frozen=True)
class Grade:
    """The extracted answer (None: no complete ``\\boxed{}``) and whether it matches the reference."""

    answer: str | None
    correct: bool


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (braces may nest), else None."""
    last = None
    for box in _BOX.finditer(text):
        depth = 1
        for token in _BRACE_OR_ESCAPE.finditer(text, box.end()):
            depth += {"{": 1, "}": -1}.get(token.group(), 0)  # escapes such as \{ count as neither
            if depth == 0:
                last = text[box.end():token.start()].strip()
                break
    return last


def normalize(answer: str) -> str:
    """A canonical string form: no delimiters, spacing, text wrappers or trailing period; lower case."""
    s = _strip_delimiters(answer.strip().rstrip("."))
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _SPACING.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".").lower()


def _strip_delimiters(answer: str) -> str:
    s = answer.strip()
    for left, right in _DELIMITERS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left):-len(right)].strip()
    return s


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def _parsed(answer: str) -> tuple:
    """math-verify's parse of ``answer`` as inline LaTeX (empty: unparseable). Cached: votes repeat answers."""
    timeout = _timeout()
    return tuple(parse(f"${_strip_delimiters(answer)}$", parsing_timeout=timeout))


def parses(answer: str) -> bool:
    """Whether math-verify reads ``answer`` as math: its parse holds an expression, not only the
    text itself. An unparseable gold answer matches only answers equal to it as text."""
    return any(not isinstance(item, str) for item in _parsed(answer))


def answers_match(reference: str, answer: str) -> bool:
    """Whether ``answer`` is equivalent to ``reference`` (string-normalized equality, then math-verify)."""
    if normalize(reference) == normalize(answer):
        return True
    gold, pred = _parsed(reference), _parsed(answer)
    if not gold or not pred:
        return False
    return verify(list(gold), list(pred), timeout_seconds=_timeout())


def grade(response: str, reference: str) -> Grade:
    """Grade ``response`` (its last ``\\boxed{}``) against ``reference`` (see the module docstring)."""
    answer = extract_boxed(response)
    return Grade(answer, answer is not None and answers_match(reference, answer))
