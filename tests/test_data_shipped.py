"""The shipped arithmetic data and tokenizer: correct, reproducible from the script, usable offline."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def _script():
    from tools import make_math_data

    return make_math_data


def _rows(split: str, task: str = "arith") -> list[dict]:
    with open(DATA / task / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_data_is_reproducible_from_the_script():
    train, test = _script().generate(seed=0, n_train=4000, n_test=500)
    assert [r.to_json() for r in train] == _rows("train") and [r.to_json() for r in test] == _rows("test")
    assert [r.to_terse_json() for r in train] == _rows("train", "arith_terse")
    assert [r.to_terse_json() for r in test] == _rows("test", "arith_terse")


@pytest.mark.parametrize("split", ["train", "test"])
def test_terse_solutions_are_the_same_problems_with_one_correct_expression(split):
    tok = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    for row, terse in zip(_rows(split), _rows(split, "arith_terse"), strict=True):
        assert {**terse, "solution": row["solution"]} == row
        (expression, answer), = re.findall(r"^([\d +*/-]+) = \\boxed\{(\d+)\}$", terse["solution"])
        assert answer == row["answer"] and eval(expression) == int(answer)  # only digits and operators
        assert tok.unk_token_id not in tok.encode(terse["solution"], add_special_tokens=False)


def test_tokenizer_is_reproducible_from_the_script(tmp_path):
    _script().train_tokenizer(_rows("train"), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (DATA / "tokenizer" / name).read_bytes(), name


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_step_is_correct_and_the_answer_is_boxed(split):
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    kinds = set()
    for row in _rows(split):
        kinds.add(row["kind"])
        lines = row["solution"].split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{row['answer']}}}."
        assert 2 <= len(lines) - 1 <= 3
        last = None
        for line in lines[:-1]:
            (a, op, b, c), = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", line)
            a, b, c = int(a), int(b), int(c)
            assert ops[op](a, b) == c and (op != "/" or a % b == 0) and c >= 0
            last = c
        assert str(last) == row["answer"]
    assert len(kinds) == 10


def test_splits_are_disjoint():
    train = {r["problem"] for r in _rows("train")}
    test = {r["problem"] for r in _rows("test")}
    assert len(train) == 4000 and len(test) == 500 and not train & test


@pytest.mark.parametrize("cls", [AutoTokenizer, PreTrainedTokenizerFast])
def test_tokenizer_loads_offline_with_chat_special_tokens(cls):
    tok = cls.from_pretrained(DATA / "tokenizer")
    assert len(tok) <= 1024 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = "Tom has 12 apples.\nThe answer is \\boxed{17}."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert [tok.decode([i]) for i in tok.encode("123", add_special_tokens=False)] == ["1", "2", "3"]
    chat = [{"role": "user", "content": "Hi"}]
    off = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert tok.decode(tok.encode(off, add_special_tokens=False), skip_special_tokens=True) == "user\nHi\nassistant\n<think>\n\n</think>\n\n"
