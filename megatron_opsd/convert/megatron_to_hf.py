"""Convert a Megatron dist checkpoint (from convert_hf_to_megatron.py or training) to a Hugging
Face directory: config, sharded safetensors + index, tokenizer files.

    python tools/convert_megatron_to_hf.py --megatron-dir DIR --out DIR
    torchrun --nproc-per-node=N tools/convert_megatron_to_hf.py ... --tp T --pp P

The model's HF config and tokenizer files come from ``<megatron-dir>/hf`` (written by
convert_hf_to_megatron.py and into every training checkpoint) or from ``--hf-config DIR``. Tensors are
written in that config's dtype. The output appears only when complete (written to a hidden
sibling directory, then renamed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from megatron_opsd.models import build_model, checkpoint, checkpoint_dtype, load_hf_config
from megatron_opsd.models.bridge import write_hf_model
from megatron_opsd.models.hf_io import copy_non_weight_files
from megatron_opsd.parallel import Layout, initialize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-config", help="HF directory with config and tokenizer files (default: <megatron-dir>/hf)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    groups = initialize(Layout(args.tp, args.pp))
    hf_files = Path(args.hf_config) if args.hf_config else checkpoint.hf_config_dir(args.megatron_dir)
    config = load_hf_config(hf_files)
    dtype = checkpoint_dtype(config)
    chunks = build_model(config, dtype, groups=groups, perform_initialization=False)  # every weight is loaded next
    checkpoint.load(chunks, args.megatron_dir)
    write_hf_model(chunks, args.out, lambda out: copy_non_weight_files(hf_files, out), dtype=dtype,
                   max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    if dist.get_rank() == 0:
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
