"""Check a Megatron checkpoint (converted or trained) against a Hugging Face model of the same
config: the same random token batch goes through transformers and through Megatron at the given
layout (both fp32).

    python tools/verify_conversion.py --hf-dir DIR --megatron-dir DIR
    torchrun --nproc-per-node=4 tools/verify_conversion.py --hf-dir DIR --megatron-dir DIR --tp 2 --pp 2

Prints max |logit diff| and max |log-prob diff| over the true vocabulary; exits 1 above --tol.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_opsd.models import attention_mask, build_model, checkpoint, load_hf_config
from megatron_opsd.models.forward import forward_only
from megatron_opsd.parallel import Layout, initialize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    groups = initialize(Layout(args.tp, args.pp))
    config = load_hf_config(args.hf_dir)
    chunks = build_model(config, torch.float32, groups=groups)
    checkpoint.load(chunks, args.megatron_dir)

    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    position_ids = torch.arange(args.seq_len).expand(args.batch_size, -1)
    mask = attention_mask(torch.zeros_like(input_ids))
    device = next(chunks[0].parameters()).device
    batch = {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "attention_mask": mask.to(device),
    }
    outputs = forward_only(chunks, [batch], gather_logits=True)

    diffs = torch.zeros(2, dtype=torch.float64, device=device)
    if groups.last_stage:
        hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(input_ids).logits.double()
        ours = outputs[0][..., : config.vocab_size].double().cpu()
        diffs[0] = (ours - ref).abs().max()
        diffs[1] = (ours.log_softmax(-1) - ref.log_softmax(-1)).abs().max()
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    ok = bool(diffs.max() <= args.tol)
    if dist.get_rank() == 0:
        print(
            f"tp={args.tp} pp={args.pp} max|logit diff|={diffs[0].item():.3e} "
            f"max|log-prob diff|={diffs[1].item():.3e} tol={args.tol:g} -> {'OK' if ok else 'FAIL'}"
        )
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
