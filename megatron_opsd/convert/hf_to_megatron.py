"""Convert a Hugging Face Llama/Qwen2/Qwen3 checkpoint into a Megatron dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR
    torchrun --nproc-per-node=N tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR --tp T --pp P

The result loads at any TP/PP layout. Tensors keep the checkpoint's dtype. The output appears
only when complete (written to a hidden sibling directory, then renamed).
"""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from megatron_opsd.models import build_model, checkpoint, checkpoint_dtype, load_hf_config
from megatron_opsd.models.bridge import load_hf_weights
from megatron_opsd.parallel import Layout, initialize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    groups = initialize(Layout(args.tp, args.pp))
    config = load_hf_config(args.hf_dir)
    chunks = build_model(config, checkpoint_dtype(config), groups=groups, perform_initialization=False)  # every weight is loaded next
    load_hf_weights(chunks, args.hf_dir)
    checkpoint.save(chunks, args.out, hf_files_from=args.hf_dir, overwrite=args.overwrite)
    if dist.get_rank() == 0:
        print(f"wrote {args.out} (tp={args.tp} pp={args.pp}) in {time.perf_counter() - start:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
