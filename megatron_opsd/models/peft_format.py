"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``
with full (TP-gathered) ``lora_A`` / ``lora_B`` per projection, loadable by ``peft`` on the HF model
(``PeftModel.from_pretrained``) and back into the Megatron adapters at any TP/PP layout."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_opsd.fileio import CheckpointError, atomic_output_dir
from megatron_opsd.models.lora import HF_MODULES, LinearAdapters, LoraConfig, adapters_of
from megatron_opsd.parallel import ParallelGroups

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _peft_names(chunks: Sequence[nn.Module]) -> list[tuple[str, LinearAdapters, str]]:
    """(PEFT module name, adapters, projection) of every adapter of this rank's chunks."""
    out = []
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            prefix = f"{PREFIX}model.layers.{layer.layer_number - 1}."
            out += [(prefix + HF_MODULES[p], a, p) for a in adapters_of([layer]) for p in a.targets]
    return out


def _sharded(adapters: LinearAdapters, which: str) -> int | None:
    """The dim TP splits ``which`` (A or B) of ``adapters`` along, or None when it is replicated."""
    if adapters.kind == "column":
        return 0 if which == "B" else None
    return 1 if which == "A" else None


def _gather(tensor: torch.Tensor, dim: int | None, groups: ParallelGroups) -> torch.Tensor:
    if dim is None or groups.tp_size == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=groups.tp)
    return torch.cat(parts, dim=dim)


def write_peft_adapters(chunks: Sequence[nn.Module], out: str | Path, cfg: LoraConfig,
                        base_model: str | None = None) -> Path:
    """The adapters as a PEFT directory ``out`` (collective; written by global rank 0)."""
    groups = unwrap_model(chunks[0]).groups
    tensors = {}
    for name, adapters, projection in _peft_names(chunks):
        for which, param in zip("AB", adapters.pair(projection)):
            tensors[f"{name}.lora_{which}.weight"] = _gather(param, _sharded(adapters, which), groups).cpu()
    sender = groups.tp_rank == 0 and groups.dp_cp_rank == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(tensors if sender else None, gathered, dst=0)
    with atomic_output_dir(out, overwrite=True) as tmp:
        if dist.get_rank() == 0:
            merged = {k: v.contiguous() for part in gathered if part for k, v in part.items()}
            save_file(merged, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / CONFIG).write_text(json.dumps(_peft_config(cfg, base_model), indent=2) + "\n")
    return Path(out)


def _peft_config(cfg: LoraConfig, base_model: str | None) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": cfg.r,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(HF_MODULES[t].rsplit(".", 1)[1] for t in cfg.targets), "use_rslora": False,
            "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}


@torch.no_grad()
def load_peft_adapters(chunks: Sequence[nn.Module], path: str | Path, cfg: LoraConfig) -> None:
    """Fill this rank's adapters from the PEFT directory ``path`` (its shards of each tensor)."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if (config.get("r"), float(config.get("lora_alpha", 0))) != (cfg.r, cfg.alpha):
        raise CheckpointError(f"{path / CONFIG}: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; "
                              f"model.lora has r={cfg.r}, alpha={cfg.alpha}")
    weights = load_file(str(path / WEIGHTS))
    groups = unwrap_model(chunks[0]).groups
    rank, size = groups.tp_rank, groups.tp_size
    for name, adapters, projection in _peft_names(chunks):
        for which, param in zip("AB", adapters.pair(projection)):
            key = f"{name}.lora_{which}.weight"
            if key not in weights:
                raise CheckpointError(f"{path / WEIGHTS} has no {key}")
            full, dim = weights[key], _sharded(adapters, which)
            local = full if dim is None else full.chunk(size, dim=dim)[rank]
            if local.shape != param.shape:
                raise CheckpointError(f"{key} in {path / WEIGHTS}: shape {list(full.shape)} does not fit this model")
            param.copy_(local)
