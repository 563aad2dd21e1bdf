"""Each recipe's shrunken twin at TP=2: the recipe's own settings (LoRA or not, teacher, loss,
sampling, optimizer) on a tiny model with its architecture's features (GQA ratio, tied or untied
embeddings, rope scaling, qk-norm), on the shipped data; and that architecture converted HF ->
Megatron (TP=2) -> HF (read back at PP=2) bitwise. Run by tests/test_recipes.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_opsd.models import build_model, checkpoint
from megatron_opsd.models.bridge import load_hf_weights, model_hf_tensors
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.config import TrainConfig
from megatron_opsd.train.loop import train
from tests.support.distributed import run_checks, workdir_arg

REPO = Path(__file__).resolve().parents[2]
RECIPES = {"qwen3_1p7b_paper": "qwen3_1p7b", "qwen3_4b_paper": "qwen3_4b", "qwen3_8b_paper": "qwen3_8b",
           "llama3_70b": "llama3_70b", "qwen3_4b_grpo_paper": "qwen3_4b"}
WORK = Path()


def setup() -> None:
    global WORK
    WORK = workdir_arg()


def twin_config(model: str) -> dict:
    """The real config.json of ``model`` with tiny sizes: the same GQA ratio (2 KV heads, so that
    TP=2 splits whole groups), embeddings tie, rope scaling and architecture."""
    real = json.loads((REPO / "examples" / "models" / model / "config.json").read_text())
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    twin = {k: v for k, v in real.items() if k not in ("bos_token_id", "eos_token_id", "torch_dtype")}
    twin.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
                num_attention_heads=2 * ratio, head_dim=16, vocab_size=1024, max_position_embeddings=512)
    if "max_window_layers" in twin:
        twin["max_window_layers"] = 2
    return twin


def twin_run(recipe: str) -> TrainConfig:
    raw = yaml.safe_load((REPO / "examples" / f"{recipe}.yaml").read_text())
    raw["model"] = {"config": twin_config(RECIPES[recipe]), "dtype": "float32", "lora": raw["model"].get("lora")}
    raw["rollout"].update(engine={"kind": "embedded"}, sync={"kind": "inprocess", "probe_tolerance": 1e-3},
                          max_new_tokens=8, stop_tokens=["<|im_end|>"])
    raw.update(run_dir=str(WORK / recipe), steps=2, prompts_per_step=2, tokenizer=str(REPO / "data/tokenizer"),
               data={"path": str(REPO / "data/arith/train.jsonl")}, parallel={"tp": 2, "pp": 1}, eval={"data": None},
               prompts={"template": "custom", "student_template": "{problem}", "eval_template": "{problem}",
                        "teacher_template": "{problem}\n\nReference solution:\n{solution}",
                        "max_student_prompt_tokens": 128, "max_teacher_prompt_tokens": 384},
               packing={"tokens_per_micro_batch": 256, "teacher_tokens_per_micro_batch": 512},
               checkpoint={"interval": 2, "keep_last": 1}, tracking={"wandb": False, "progress": False})
    return TrainConfig.model_validate(raw)


def check_twin_trains(recipe: str) -> None:
    cfg = twin_run(recipe)
    train(cfg)
    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["probe/logprob_abs_diff_max"] < 1e-3 for r in records if "loss" in r)


def check_twin_converts_bitwise(recipe: str) -> None:
    model = RECIPES[recipe]
    hf_dir, out = WORK / f"{model}_hf", WORK / f"{model}_megatron"
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**twin_config(model)), dtype=torch.float32) \
            .save_pretrained(hf_dir)
    dist.barrier()
    groups = initialize(Layout(2, 1))
    chunks = build_model(hf_dir, groups=groups)
    load_hf_weights(chunks, hf_dir)
    checkpoint.save(chunks, out, hf_files_from=hf_dir, overwrite=True)
    groups = initialize(Layout(1, 2))
    chunks = build_model(out / "hf", groups=groups)
    checkpoint.load(chunks, out)
    exported = dict(model_hf_tensors(chunks))
    if dist.get_rank() == 0:
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
        expected = {k for k in reference if not (k == "lm_head.weight" and twin_config(model)["tie_word_embeddings"])}
        missing, extra = expected - set(exported), set(exported) - expected
        assert not missing and not extra, f"{model}: missing {missing}, extra {extra}"
        changed = [k for k in expected if not torch.equal(exported[k], reference[k])]
        assert not changed, f"{model}: HF -> Megatron -> HF changed {changed[:3]}"


CHECKS = {f"trains_{recipe}": (lambda r=recipe: check_twin_trains(r)) for recipe in RECIPES}
CHECKS |= {f"converts_{model}": (lambda r=recipe: check_twin_converts_bitwise(r))
           for model, recipe in {m: r for r, m in RECIPES.items()}.items()}

if __name__ == "__main__":
    run_checks(CHECKS, setup)
