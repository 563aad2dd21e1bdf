"""``opsd data preview CONFIG [--rows N] [key=value ...]``: look at the data before renting a cluster.

Renders the student and teacher prompts of the first N problems training would draw, with token
counts; measures prompt lengths and the length policy over the whole data set; reports the packing
efficiency with each reference solution (+ EOS) standing in for the rollout. Any validation error
of the data set fails the command with the message that names the row and field. A whole training
config is validated as such (so it sits beside the ``opsd`` entry point, above ``train``).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from megatron_opsd.config import ConfigError, load_config
from megatron_opsd.data.packing import PackingConfig, assign_micro_batches
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig, load_tokenizer
from megatron_opsd.data.sources import DataConfig, ProblemIterator, load_problems
from megatron_opsd.eval.evaluate import unparseable_references
from megatron_opsd.section import Section


class PreviewConfig(Section):
    """The data-side subtree of a training config: what ``opsd data preview`` reads (from a file
    with just these keys, or from a whole ``opsd train`` config)."""

    tokenizer: str
    data: DataConfig
    prompts: PromptConfig = PromptConfig()
    packing: PackingConfig = PackingConfig()


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="inspect a data set")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = sub.add_parser("preview", help="render prompts, token counts and packing efficiency; fail on invalid rows")
    p.add_argument("config", type=Path, help="training config, or a YAML file with just tokenizer, data, prompts, packing")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.split=test")
    p.add_argument("--rows", type=int, default=3, help="problems to render (default 3)")
    p.add_argument("--step-samples", type=int, default=256, help="pairs packed together, as in one training step")
    p.set_defaults(func=run)


def _summary(values: list[int]) -> str:
    return f"min {min(values)} / median {int(statistics.median(values))} / max {max(values)}"


def load_preview_config(path: Path, overrides: list[str]) -> PreviewConfig:
    """A training config (recognised by its ``model`` section) is validated whole, then its
    data-side subtree is taken; otherwise the file holds just that subtree."""
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        tree = None  # load_config reports it
    if not (isinstance(tree, dict) and "model" in tree):
        return load_config(PreviewConfig, path, overrides)
    # imports Megatron: only when needed
    from megatron_opsd.train.config import TrainConfig

    full = load_config(TrainConfig, path, overrides)
    return PreviewConfig(tokenizer=full.tokenizer, data=full.data, prompts=full.prompts, packing=full.packing)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cfg = load_preview_config(args.config, args.overrides)
    if cfg.data.fields.solution is None:
        raise ConfigError("opsd data preview renders teacher prompts with the reference solutions, and "
                          "data.fields.solution is null")
    tokenizer = load_tokenizer(cfg.tokenizer)
    builder = PromptBuilder(tokenizer, cfg.prompts)
    problems = builder.fitting(load_problems(cfg.data), cfg.data.on_invalid_row)  # as training loads them
    p = cfg.prompts
    print(f"data: {problems.label}: {problems.num_rows} rows, {len(problems)} usable, {problems.num_skipped} skipped")
    ungradable = unparseable_references(problems.problems)
    print(f"gold answers math-verify cannot parse (graded as text only): {len(ungradable)}"
          + (f", rows {ungradable[:10]}{' ...' if len(ungradable) > 10 else ''}" if ungradable else ""))
    print(f"tokenizer: {cfg.tokenizer} ({len(tokenizer)} tokens)")
    print(f"prompts: template {p.template}, student thinking {'on' if p.student_thinking else 'off'}, "
          f"teacher thinking {'on' if p.teacher_thinking else 'off'}, limits {p.max_student_prompt_tokens} / "
          f"{p.max_teacher_prompt_tokens} tokens, over-long teacher prompt: {p.overlong_teacher}")

    for item in ProblemIterator(problems, cfg.data.seed, cfg.data.shuffle).take(min(args.rows, len(problems))):
        student, teacher = builder.student_ids(item), builder.teacher_ids(item)
        print(f"\n===== row {item.index} (answer: {item.answer}) =====")
        print(f"----- student prompt: {len(student)} tokens -----\n{tokenizer.decode(student)}")
        print(f"----- teacher prompt: {len(teacher)} tokens -----\n{tokenizer.decode(teacher)}")

    builder.stats.clear()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    student_lengths, teacher_lengths = [], []
    for item in tqdm(problems.problems, desc="rendering prompts", unit="row"):
        response = len(tokenizer.encode(item.solution, add_special_tokens=False)) + len(eos)
        student_lengths.append(len(builder.student_ids(item)) + response)
        teacher_lengths.append(len(builder.teacher_ids(item)) + response)
    print(f"\nsequence lengths with the reference solution as response, tokens: student {_summary(student_lengths)}, "
          f"teacher {_summary(teacher_lengths)}; teacher solutions trimmed: {builder.stats['teacher_solution_trimmed']}")

    s_budget, t_budget = cfg.packing.budgets()
    micro_batches = padded = 0
    for start in range(0, len(problems), args.step_samples):
        s, t = student_lengths[start:start + args.step_samples], teacher_lengths[start:start + args.step_samples]
        micro_batches += len(assign_micro_batches(s, t, s_budget, t_budget))
        padded += sum(max(s[i:i + 8]) * len(s[i:i + 8]) for i in range(0, len(s), 8))
    print(f"packing, {args.step_samples} pairs per step into budgets of {s_budget} / {t_budget} tokens: "
          f"{micro_batches} micro-batches, filled to {sum(student_lengths) / (micro_batches * s_budget):.1%} / "
          f"{sum(teacher_lengths) / (micro_batches * t_budget):.1%} (student / teacher; rows are not padded "
          f"beyond the TP multiple); per-sample padding to the longest of 8 would be "
          f"{sum(student_lengths) / padded:.1%} non-pad")
    return 0
