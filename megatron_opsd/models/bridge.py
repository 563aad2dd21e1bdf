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

Export streams one logical tensor at a time, so peak extra memory is one full tensor:
- :func:`stage_hf_tensors`: a pipeline stage's own parameters, gathered over TP onto the stage's
  first TP rank of data-parallel replica 0 (its *sender*): what a sync that sends from every
  stage needs, without any rank holding the whole model;
- :func:`model_hf_tensors`: the whole model on global rank 0, each later stage's sender sending
  its tensors there point to point: what needs every tensor in one place (conversion, an engine
  in the trainer's process). :func:`write_hf_model` writes it as a Hugging Face directory.
Both are collectives that yield only on their destination rank; a rank that takes part without
consuming iterates the stream to its end (:func:`drain`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_opsd.fileio import CheckpointError, atomic_output_dir
from megatron_opsd.models.architectures import Architecture
from megatron_opsd.models.gpt import LlamaFamilyModel
from megatron_opsd.models.hf_io import HFReader, write_hf_shards
from megatron_opsd.models.lora import is_adapter_param, merged_weights
from megatron_opsd.parallel import ParallelGroups, group_size

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
    merged: Callable[[], Tensor] | None = None  # with LoRA adapters: base + scale * B @ A (models/lora.py)

    def value(self) -> Tensor:
        """What export writes: the parameter, or its merged weight when an adapter sits on it."""
        return self.merged() if self.merged is not None else self.param.detach()


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


def _items(chunk: LlamaFamilyModel) -> list[_Item]:
    arch, items, merged = chunk.arch, [], merged_weights(chunk)
    for name, param in chunk.named_parameters():
        if is_adapter_param(name):  # merged into its base weight on export; HF checkpoints hold none
            continue
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
            items.append(_Item(name, param, kind, tuple(f"model.layers.{layer}.{s}" for s in suffixes),
                               merged=merged.get(name)))
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
def load_hf_weights(chunks: list[LlamaFamilyModel], hf_dir: str | Path) -> None:
    """Fill this rank's chunks from an HF safetensors directory (any TP/PP layout).

    The directory is validated first against the model's config (see ``HFReader``); every
    parameter of every chunk is written, so nothing keeps its random initialization.
    """
    for chunk in chunks:
        rank, size = chunk.groups.tp_rank, chunk.groups.tp_size
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


def _gather_tp(item: _Item, arch: Architecture, group: dist.ProcessGroup | None) -> list[Tensor] | None:
    """Full HF tensors for ``item`` on the group's first rank, None on the others (collective over TP)."""
    local, size = item.value(), group_size(group)
    first = dist.get_process_group_ranks(group)[0] if size > 1 else dist.get_rank()
    if item.kind == "replicated":
        return [local] if dist.get_rank() == first else None
    parts = [local]
    if size > 1:
        parts = [torch.empty_like(local) for _ in range(size)] if dist.get_rank() == first else None
        dist.gather(local.contiguous(), parts, dst=first, group=group)
        if parts is None:
            return None
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


def _in_replica_zero(groups: ParallelGroups) -> bool:
    """Whether this rank belongs to data-parallel (and context-parallel) replica 0, the one exported."""
    return groups.dp_cp_rank == 0


def is_stage_sender(groups: ParallelGroups) -> bool:
    """Whether this rank yields its pipeline stage's tensors in :func:`stage_hf_tensors`."""
    return _in_replica_zero(groups) and groups.tp_rank == 0


def stage_hf_shapes(chunks: list[LlamaFamilyModel]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor :func:`stage_hf_tensors` yields on this stage, in its order."""
    (chunk,) = chunks
    shapes = hf_shapes(chunk.arch)
    return [(name, shapes[name]) for item in _items(chunk) if item.exported for name in item.hf_names]


def stage_hf_tensors(chunks: list[LlamaFamilyModel], dtype: torch.dtype | None = None, *,
                     placeholders: bool = False) -> Iterator[tuple[str, Tensor | None]]:
    """This pipeline stage's own parameters as (HF name, full tensor) pairs, gathered over TP.

    Every rank may call it. The tensors are yielded on the stage's sender (:func:`is_stage_sender`:
    its first TP rank of data-parallel replica 0); the other TP ranks of that replica take part in
    the gathers and yield nothing, or ``(name, None)`` per tensor with ``placeholders`` (to step in
    lockstep with the sender); ranks of other replicas return at once. Order: module order. Tensors
    are in ``dtype`` (default the model's) and may share storage with the model: copy before modifying.
    """
    (chunk,) = chunks  # virtual pipeline stages are not supported
    if not _in_replica_zero(chunk.groups):
        return
    out_dtype = dtype or chunk.config.params_dtype
    for item in _items(chunk):
        if not item.exported:
            continue
        tensors = _gather_tp(item, chunk.arch, chunk.groups.tp)
        if tensors is not None:
            yield from zip(item.hf_names, (t.to(out_dtype).contiguous() for t in tensors), strict=True)
        elif placeholders:
            yield from ((name, None) for name in item.hf_names)


def model_hf_tensors(chunks: list[LlamaFamilyModel], dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """The whole model as (HF name, full tensor) pairs, yielded on global rank 0 only.

    Collective over the model-parallel ranks of data-parallel replica 0 (every rank may call it;
    the others return at once): each stage's sender (:func:`stage_hf_tensors`) sends its tensors
    to rank 0, which yields them in pipeline-stage order, one tensor in flight at a time.
    """
    (chunk,) = chunks
    groups = chunk.groups
    stage = stage_hf_tensors(chunks, dtype)
    pp_size = groups.pp_size
    if pp_size == 1 or not _in_replica_zero(groups):
        yield from stage
        return
    if groups.tp_rank != 0:
        drain(stage)  # its part of the TP gathers; the stage's sender sends
        return
    # The stage senders and rank 0 form the pipeline group of TP rank 0 in replica 0.
    pp_group, my_stage = groups.pp, groups.pp_rank
    stages: list[list[tuple[str, tuple[int, ...]]]] = [None] * pp_size
    dist.all_gather_object(stages, stage_hf_shapes(chunks), group=pp_group)
    senders = dist.get_process_group_ranks(pp_group)
    if my_stage != 0:
        for _, tensor in stage:
            dist.send(tensor, dst=senders[0])
        return
    yield from stage
    out_dtype, device = dtype or chunk.config.params_dtype, next(chunk.parameters()).device
    for sender, stage_shapes in zip(senders[1:], stages[1:]):
        for name, shape in stage_shapes:
            tensor = torch.empty(shape, dtype=out_dtype, device=device)
            dist.recv(tensor, src=sender)
            yield name, tensor


def drain(stream: Iterable[object]) -> None:
    """Iterate a collective stream to its end without using it: a rank's part of the communication."""
    for _ in stream:
        pass


def write_hf_model(chunks: list[LlamaFamilyModel], out: str | Path, write_files: Callable[[Path], None], *,
                   dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """The model as a Hugging Face directory ``out``: safetensors shards + index, and what
    ``write_files(dir)`` adds (config, tokenizer). Collective; the directory appears only when complete."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        tensors = model_hf_tensors(chunks, dtype)
        if dist.get_rank() == 0:
            write_hf_shards(tensors, tmp, max_shard_bytes=max_shard_bytes)
            write_files(tmp)
        else:
            drain(tensors)
    return Path(out)
