"""Prompts: the paper's templates exactly, privileged solution only for the teacher, length policy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_opsd.data.prompts import PromptBuilder, PromptConfig, PromptError, PromptLengthError
from megatron_opsd.data.sources import Problem

REPO = Path(__file__).resolve().parents[1]

# The paper's v3 prompts (arXiv 2601.18734v3) as written in the project's notes: "\n" is a line break.
PAPER_STUDENT = r"Problem: {problem}\n\nPlease reason step by step, and put your final answer within \boxed{}."
PAPER_TEACHER = r"Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each step — do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final answer to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack or reconsider if something doesn't work out:\n\nPlease reason step by step, and put your final answer within \boxed{}."
PAPER_EVAL = r"{problem}\n\nPlease reason step by step, and put your final answer within \boxed{}."


def paper(text: str, problem: str, solution: str = "") -> str:
    return text.replace(r"\n", "\n").replace("{problem}", problem).replace("{solution}", solution)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")


@pytest.fixture(scope="module")
def rows() -> list[Problem]:
    with open(REPO / "data" / "arith" / "train.jsonl") as f:
        return [Problem(i, r["problem"], r["solution"], r["answer"]) for i, r in enumerate(map(json.loads, f)) if i < 200]


def test_v3_prompts_equal_the_paper_text(tok, rows):
    b = PromptBuilder(tok, PromptConfig())
    item = rows[0]
    assert b.student_text(item.problem) == (
        "<|im_start|>user\n" + paper(PAPER_STUDENT, item.problem) + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert b.teacher_text(item.problem, item.solution) == (
        "<|im_start|>user\n" + paper(PAPER_TEACHER, item.problem, item.solution) + "<|im_end|>\n<|im_start|>assistant\n")
    assert b.eval_text(item.problem) == "<|im_start|>user\n" + paper(PAPER_EVAL, item.problem) + "<|im_end|>\n<|im_start|>assistant\n"
    assert "\u2014" in b.teacher_text(item.problem, item.solution)
    assert "=== Reference Solution End ===\n\n\nAfter reading" in b.teacher_text(item.problem, item.solution)


def test_solution_in_every_teacher_prompt_and_no_student_prompt(tok, rows):
    for template in ("v3", "v1"):
        b = PromptBuilder(tok, PromptConfig(template=template))
        for item in rows:
            teacher = tok.decode(b.teacher_ids(item))
            student = tok.decode(b.student_ids(item))
            assert item.solution in teacher and item.problem in teacher
            assert item.solution not in student and item.problem in student
            assert "Reference Solution" not in student and "reference solution" not in student


def test_v1_is_selectable(tok):
    b = PromptBuilder(tok, PromptConfig(template="v1"))
    assert b.student_text("P").startswith("<|im_start|>user\nProblem: P\n\nAnswer:<|im_end|>")
    assert "Here is a reference solution:\nS\n\nAfter understanding the reference solution" in b.teacher_text("P", "S")


def test_thinking_flags_and_teacher_think_opener(tok):
    b = PromptBuilder(tok, PromptConfig(student_thinking=True, teacher_thinking=False, teacher_think_opener="<think>\n"))
    assert b.student_text("P").endswith("<|im_start|>assistant\n")
    assert b.teacher_text("P", "S").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n<think>\n")
    b = PromptBuilder(tok, PromptConfig(teacher_think_opener="<think>\n"))
    ids = b.teacher_ids(Problem(0, "P", "S", None))
    assert ids[-2:] == tok.encode("<think>\n", add_special_tokens=False)


def test_custom_templates_render(tok):
    cfg = PromptConfig(template="custom", student_template="Q: {problem} \\boxed{{}}", teacher_template="Q: {problem}\nRef: {solution}")
    b = PromptBuilder(tok, cfg)
    assert "Q: P \\boxed{}<|im_end|>" in b.student_text("P")
    assert "Q: P\nRef: S<|im_end|>" in b.teacher_text("P", "S")
    assert paper(PAPER_EVAL, "P") in b.eval_text("P")


@pytest.mark.parametrize("fields,match", [
    ({"teacher_template": "{problem} only"}, "teacher template has no {solution}"),
    ({"student_template": "{problem} {solution}"}, "student template contains {solution}"),
    ({"eval_template": "{problem} {solution}"}, "eval template contains {solution}"),
    ({"student_template": "{problem} {answer}"}, r"unknown field \{answer\}"),
    ({"student_template": "{problem} \\boxed{}"}, r"unknown field \{\}"),
    ({"student_template": "{problem!r}"}, r"unknown field \{problem!r\}"),
    ({"student_template": "{problem} {"}, "Single '{' encountered"),
    ({"student_template": "no fields"}, "student template has no {problem}"),
])
def test_custom_template_errors(fields, match):
    base = {"template": "custom", "student_template": "{problem}", "teacher_template": "{problem} {solution}"}
    with pytest.raises(ValueError, match=match):
        PromptConfig(**{**base, **fields})


def test_template_config_errors():
    with pytest.raises(ValueError, match="set template: custom"):
        PromptConfig(template="v3", teacher_template="{problem} {solution}")
    with pytest.raises(ValueError, match="needs teacher_template"):
        PromptConfig(template="custom", student_template="{problem}")


def test_tokenizer_without_chat_template_is_refused(tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(PromptError, match="no chat template"):
        PromptBuilder(bare, PromptConfig())


def test_overlong_teacher_prompt_trims_the_solution_not_the_problem(tok, rows, caplog):
    item = rows[0]
    full = PromptBuilder(tok, PromptConfig()).teacher_ids(item)
    limit = len(full) - 12
    b = PromptBuilder(tok, PromptConfig(max_teacher_prompt_tokens=limit))
    ids = b.teacher_ids(item)
    text = tok.decode(ids)
    assert len(full) - 20 <= len(ids) <= limit
    assert item.problem in text and item.solution not in text
    kept = text.split("=== Reference Solution Begin ===\n")[1].split("\n=== Reference Solution End ===")[0]
    assert kept and item.solution.startswith(kept)
    assert b.stats["teacher_solution_trimmed"] == 1 and b.stats["teacher_prompts"] == 1
    assert "row 0: reference solution trimmed to" in caplog.text


def test_overlong_prompt_errors(tok, rows):
    item = rows[0]
    n_teacher = len(PromptBuilder(tok, PromptConfig()).teacher_ids(item))
    with pytest.raises(PromptLengthError, match="row 0: teacher prompt has"):
        PromptBuilder(tok, PromptConfig(max_teacher_prompt_tokens=n_teacher - 1, overlong_teacher="error")).teacher_ids(item)
    with pytest.raises(PromptLengthError, match="even with the solution trimmed"):
        PromptBuilder(tok, PromptConfig(max_teacher_prompt_tokens=40)).teacher_ids(item)
    with pytest.raises(PromptLengthError, match="row 0: student prompt has"):
        PromptBuilder(tok, PromptConfig(max_student_prompt_tokens=10)).student_ids(item)


def test_teacher_think_opener_ends_the_teacher_prompt(tok, rows):
    b = PromptBuilder(tok, PromptConfig(teacher_think_opener="<think>\n"))
    t = b.teacher_ids(rows[3])
    assert t[-2:] == tok.encode("<think>\n", add_special_tokens=False)
    assert t[:-2] == PromptBuilder(tok, PromptConfig()).teacher_ids(rows[3])


def test_any_hf_tokenizer_with_a_chat_template_and_bos():
    """A Llama-like template that emits BOS itself: the builder must not add a second one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<s>", "<unk>", "[U]", "[A]"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["[U]", "[A]"]})
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[U]{{ m['content'] }}{% endfor %}[A]"
    b = PromptBuilder(tok, PromptConfig(template="custom", student_template="{problem}", teacher_template="{problem}|{solution}"))
    ids = b.student_ids(Problem(0, "ab", "cd", None))
    assert ids == [vocab[t] for t in ["<s>", "[U]", "a", "b", "[A]"]]
    assert b.teacher_ids(Problem(0, "ab", "cd", None)) == [vocab[t] for t in ["<s>", "[U]", "a", "b", "|", "c", "d", "[A]"]]
