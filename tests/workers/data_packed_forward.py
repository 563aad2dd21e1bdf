"""Packed micro-batches through a tiny Megatron model: on every response-predicting position the
packed forward (block-diagonal mask, restarting positions) equals each sequence's own forward.
Run by tests/test_data_packed_forward.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from megatron_opsd.data.packing import PackingConfig, pack_samples
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig
from megatron_opsd.data.sample import Sample
from megatron_opsd.data.sources import Problem
from megatron_opsd.models import attention_mask, build_model
from megatron_opsd.parallel import Layout, initialize
from tests.support.distributed import run_checks
from tests.support.tiny_models import CONFIGS

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
MODEL = None


def setup() -> None:
    global MODEL
    groups = initialize(Layout())
    (MODEL,) = build_model(CONFIGS["qwen3"], torch.float32, groups=groups)
    MODEL.eval()


def samples() -> list[Sample]:
    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    builder = PromptBuilder(tok, PromptConfig(teacher_think_opener="<think>\n"))
    g = torch.Generator().manual_seed(0)
    with open(REPO / "data" / "arith" / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(7)]
    out = []
    for i, row in enumerate(rows):
        response = torch.randint(0, len(tok), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        problem = Problem(i, row["problem"], row["solution"], row["answer"])
        out.append(Sample(tuple(builder.student_ids(problem)), tuple(response),
                          teacher_prompt_ids=tuple(builder.teacher_ids(problem))))
    return out


@torch.no_grad()
def run(output: str) -> None:
    data = samples()
    # Budgets that force several samples per micro-batch and several micro-batches; TP-style padding.
    batches = pack_samples(data, PackingConfig(tokens_per_micro_batch=400, teacher_tokens_per_micro_batch=800),
                         pad_multiple=8, pad_id=0)
    assert len(batches) >= 2 and max(len(mb.sample_ids) for mb in batches) >= 2
    for mb in batches:
        for side, ids_of, start_of in (
            (mb.student, lambda s: s.student_ids, lambda s: len(s.prompt_ids)),
            (mb.teacher, lambda s: s.teacher_ids, lambda s: len(s.teacher_prompt_ids)),
        ):
            packed = MODEL(side.tokens[None], side.position_ids[None], side.attention_mask(), output=output)[0]
            packed = packed[side.predict_positions]
            alone = []
            for i in mb.sample_ids:
                ids = torch.tensor(ids_of(data[i]))[None]
                out = MODEL(ids, torch.arange(ids.shape[1])[None], attention_mask(torch.zeros_like(ids)), output=output)[0]
                alone.append(out[start_of(data[i]) - 1:-1])
            alone = torch.cat(alone)
            diff = (packed - alone).abs().max().item()
            assert diff <= TOL, f"{output}: packed vs per-sequence max |diff| {diff:.2e} > {TOL}"
            assert packed.shape[0] == mb.num_response_tokens


def packed_logits_match_per_sequence() -> None:
    run("logits")


def packed_hidden_match_per_sequence() -> None:
    run("hidden")


CHECKS = {
    "packed_logits_match_per_sequence": packed_logits_match_per_sequence,
    "packed_hidden_match_per_sequence": packed_hidden_match_per_sequence,
}

if __name__ == "__main__":
    run_checks(CHECKS, setup)
