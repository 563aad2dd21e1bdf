"""The one weight bridge between Hugging Face tensors and Megatron model chunks, tensor by tensor.

Mapping (HF <- Megatron, per layer ``model.layers.{L}`` <- ``decoder.layers.{i}``, L = global index):
- q/k/v_proj (+bias) <- ``linear_qkv``: rows interleaved per query group
  ``[q heads of group g ; k_g ; v_g]`` for g in groups; TP splits whole groups (dim 0);
- gate_proj, up_proj <- ``linear_fc1``: each TP rank holds ``[gate shard ; up shard]``;
- o_proj, down_proj <- ``linear_proj``, ``linear_fc2``: TP splits the input dim (dim 1);
- embed_tokens, lm_head <- ``word_embeddings``, ``output_layer``: TP splits vocab rows of the
  padded vocabulary; padding rows are zero on import and dropped on export;
- norms (and Qwen3 q/k norms) are replicated. Transformer Engine specs fuse the pre-attention and
  pre-MLP norms into ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``); both names map.

Import reads only this rank's slices from the memory-mapped safetensors files (``get_slice``) and
copies each byte once, straight into the parameter: no rank holds a tensor it does not own.
Export gathers one logical tensor at a time across TP, then broadcasts it across pipeline
stages, so peak extra memory is one full tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor

from megatron_opsd.models.architectures import Architecture
from megatron_opsd.models.gpt import OPSDGPTModel
from megatron_opsd.models.hf_io import CheckpointError, HFReader

EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"

# Megatron per-layer parameter suffix -> (how TP shards it, HF per-layer suffixes).
_LAYER_PARAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("glu", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Item:
    """One Megatron parameter of this rank and the HF tensors it corresponds to."""

    name: str
    param: Tensor
    kind: str  # replicated | row | glu | qkv | vocab
    hf_names: tuple[str, ...]
    exported: bool = True  # False for the last stage's copy of tied embeddings


def hf_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete HF checkpoint of ``arch`` holds, with its shape."""
    cfg = arch.hf_config
    h, d = cfg.hidden_size, arch.head_dim
    q, kv = cfg.num_attention_heads * d, (cfg.num_key_value_heads or cfg.num_attention_heads) * d
    shapes = {EMBED: (arch.vocab_size, h), FINAL_NORM: (h,)}
    if not arch.tie_embeddings:
        shapes[LM_HEAD] = (arch.vocab_size, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            }
        )
        if arch.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _items(chunk: OPSDGPTModel) -> list[_Item]:
    arch, items = chunk.arch, []
    for name, param in chunk.named_parameters():
        if name == "embedding.word_embeddings.weight":
            items.append(_Item(name, param, "vocab", (EMBED,)))
        elif name == "output_layer.weight":
            tied = arch.tie_embeddings
            items.append(_Item(name, param, "vocab", (EMBED if tied else LM_HEAD,), exported=not tied))
        elif name == "decoder.final_layernorm.weight":
            items.append(_Item(name, param, "replicated", (FINAL_NORM,)))
        elif (m := _LAYER_NAME.fullmatch(name)) and m.group(2) in _LAYER_PARAMS:
            layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1  # global, 0-based
            kind, suffixes = _LAYER_PARAMS[m.group(2)]
            items.append(_Item(name, param, kind, tuple(f"model.layers.{layer}.{s}" for s in suffixes)))
        else:
            raise KeyError(f"Megatron parameter {name} has no Hugging Face mapping")
    return items


def _qkv_dims(arch: Architecture) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    cfg = arch.hf_config
    groups = cfg.num_key_value_heads or cfg.num_attention_heads
    return groups, cfg.num_attention_heads // groups, arch.head_dim


def _shard_pairs(
    item: _Item, reader: HFReader, arch: Architecture, rank: int, size: int
) -> list[tuple[str, Tensor, object]]:
    """(HF name, destination view of the parameter, lazy source slice) for this TP rank.

    Sources are memory-mapped slices, so each byte is copied once, straight into the parameter.
    """
    param, names = item.param, item.hf_names
    if item.kind == "replicated":
        return [(names[0], param, reader.slice(names[0])[:])]
    if item.kind == "row":
        cols = param.shape[1]
        return [(names[0], param, reader.slice(names[0])[:, rank * cols : (rank + 1) * cols])]
    if item.kind == "glu":
        rows = param.shape[0] // 2
        return [
            (name, dst, reader.slice(name)[rank * rows : (rank + 1) * rows])
            for name, dst in zip(names, param.chunk(2), strict=True)
        ]
    if item.kind == "vocab":
        rows = param.shape[0]
        lo, hi = rank * rows, min((rank + 1) * rows, arch.vocab_size)
        param[max(hi - lo, 0) :].zero_()  # padding rows
        return [(names[0], param[: hi - lo], reader.slice(names[0])[lo:hi])] if hi > lo else []
    groups, per_group, d = _qkv_dims(arch)
    local = groups // size
    grouped = param.view(local, (per_group + 2) * d, *param.shape[1:])
    q_dst, k_dst, v_dst = grouped.split([per_group * d, d, d], dim=1)
    pairs = []
    for name, dst, heads in zip(names, (q_dst, k_dst, v_dst), (per_group, 1, 1), strict=True):
        rows = local * heads * d
        src = reader.slice(name)[rank * rows : (rank + 1) * rows]
        pairs.append((name, dst, src.reshape(local, heads * d, *src.shape[1:])))
    return pairs


@torch.no_grad()
def load_hf_weights(chunks: list[OPSDGPTModel], hf_dir: str | Path) -> None:
    """Fill this rank's chunks from an HF safetensors directory (any TP/PP layout).

    The directory is validated first against the model's config (see ``HFReader``); every
    parameter of every chunk is written, so nothing keeps its random initialization.
    """
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        reader = HFReader(hf_dir, hf_shapes(chunk.arch))
        for item in _items(chunk):
            for name, dst, src in _shard_pairs(item, reader, chunk.arch, rank, size):
                if dst.shape != src.shape:
                    raise CheckpointError(
                        f"tensor {name} in {reader.path(name)}: TP shard of shape {list(src.shape)} does not "
                        f"fit {item.name} (expects {list(dst.shape)})"
                    )
                dst.copy_(src)


def _cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _gather_tp(item: _Item, arch: Architecture, group: dist.ProcessGroup, size: int) -> list[Tensor]:
    """Full HF tensors for ``item`` (collective over the TP group)."""
    local = item.param.detach()
    if item.kind == "replicated":
        return [local]
    parts = [local]
    if size > 1:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
    if item.kind == "row":
        return [_cat(parts, dim=1)]
    if item.kind == "vocab":
        return [_cat(parts)[: arch.vocab_size]]
    if item.kind == "glu":
        halves = [p.chunk(2) for p in parts]
        return [_cat([h[0] for h in halves]), _cat([h[1] for h in halves])]
    groups, per_group, d = _qkv_dims(arch)
    full = _cat(parts)
    rest = full.shape[1:]
    full = full.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = full.split([per_group * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def export_hf_tensors(chunks: list[OPSDGPTModel], dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """Stream the full model as (HF name, full tensor) pairs, one logical tensor at a time.

    Collective over the model-parallel group: every TP and PP rank must iterate it to the end,
    and every rank receives every tensor (on the model's device, in ``dtype`` or the model's).
    Order: pipeline stages in order, parameters in module order within a stage. The tensors may
    share storage with the model: copy before modifying.
    """
    (chunk,) = chunks  # virtual pipeline stages are not supported
    arch = chunk.arch
    tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    pp_group, pp_size = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
    items = [item for item in _items(chunk) if item.exported]
    stages: list[list[tuple[str, ...]]] = [[item.hf_names for item in items]]
    if pp_size > 1:
        stages = [None] * pp_size
        dist.all_gather_object(stages, [item.hf_names for item in items], group=pp_group)
    pp_ranks = dist.get_process_group_ranks(pp_group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    out_dtype = dtype or chunk.config.params_dtype
    device = next(chunk.parameters()).device
    shapes = hf_shapes(arch)
    for stage, stage_items in enumerate(stages):
        for j, names in enumerate(stage_items):
            if stage == my_stage:
                tensors = [t.to(out_dtype).contiguous() for t in _gather_tp(items[j], arch, tp_group, tp_size)]
            else:
                tensors = [torch.empty(shapes[n], dtype=out_dtype, device=device) for n in names]
            if pp_size > 1:
                for tensor in tensors:
                    dist.broadcast(tensor, src=pp_ranks[stage], group=pp_group)
            yield from zip(names, tensors, strict=True)
