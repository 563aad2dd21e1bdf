"""LoRA adapters on Megatron's tensor-parallel linears, one per Hugging Face projection.

Megatron fuses q, k and v into ``linear_qkv`` and gate and up into ``linear_fc1``; the adapters
do not: each of q, k, v, o, gate, up, down has its own (A, B) as in HF PEFT, so an adapter means
the same thing at any TP/PP layout and exports to PEFT's format as it is. With scale = alpha / r,
a projection's output gains ``scale * B(A(dropout(x)))``.

Sharding follows the base linear (GQA included: TP splits whole query groups):
- column-parallel bases (q, k, v in ``linear_qkv``; gate, up in ``linear_fc1``): A [r, in] is
  replicated, B [out / TP, r] holds this rank's rows, so each projection's delta lands in the
  fused output exactly where its rows are (q, k, v interleaved per query group; gate then up).
  The gradient of A sums every rank's part (``copy_to_tensor_model_parallel_region``);
- row-parallel bases (o in ``linear_proj``, down in ``linear_fc2``): A [r, in / TP] holds this
  rank's columns, its partial products are all-reduced before the replicated B [out, r].

The adapters of one linear are a module beside it (``self_attention.lora_qkv``, ``mlp.lora_fc1``,
...): a forward hook adds their delta to the linear's output, the base's parameter names stay as
they are, and their ``sharded_state_dict`` makes checkpoints reshard like the base's. An adapter
sees what the base weight multiplies: under Transformer Engine, ``linear_qkv`` and ``linear_fc1``
are ``LayerNormLinear`` modules that normalise their input inside (the layer's own norms are
identities), so the hook applies that module's norm to the input it receives (``adapter_input``).

A starts as PEFT's (Kaiming-uniform) from a generator seeded by (seed, layer, projection) on the full shape,
B at zero, so the adapted model starts as the base at any layout. Base weights are frozen: no
gradient buffers or optimizer state. ``adapters_disabled`` is the base model (the fixed teacher)
with no copy of any weight; ``merged_weights`` is what export writes: base + scale * B @ A.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from pydantic import Field
from torch import Tensor, nn

from megatron_opsd.section import Section

Projection = Literal["q", "k", "v", "o", "gate", "up", "down"]
PROJECTIONS: tuple[Projection, ...] = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULES: dict[str, str] = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                              "down": "mlp.down_proj"}


class LoraConfig(Section):
    r: int = Field(default=64, ge=1, description="adapter rank")
    alpha: float = Field(default=128.0, gt=0, description="scale = alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on each adapter's input (training only)")
    targets: list[Projection] = Field(default_factory=lambda: list(PROJECTIONS),
                                      description="HF projections that get an adapter")
    init_from: str | None = Field(default=None, description="start the adapters from this PEFT adapter directory "
                                  "(adapter_config.json + adapter_model.safetensors); None: A random, B zero")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LinearAdapters(nn.Module):
    """The adapters of one Megatron linear: ``layout`` lists the HF projections fused in it, in
    order, with their local (out, in) sizes; ``targets`` those that have an adapter (the others add
    zero). ``kind`` ``column``: the projections' rows follow one another (gate, up) or, with
    ``groups`` > 1, interleave per query group (q, k, v); ``row``: one projection, input sharded."""

    def __init__(self, kind: Literal["column", "row"], layout: dict[str, tuple[int, int]], targets: list[str],
                 rank: int, scale: float, dropout: float, groups: int = 1):
        super().__init__()
        self.kind, self.layout, self.targets, self.scale, self.groups = kind, layout, targets, scale, groups
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        for name in targets:
            out, inp = layout[name]
            a = nn.Parameter(torch.empty(rank, inp))
            b = nn.Parameter(torch.zeros(out, rank))
            sharded, dim = (b, 0) if kind == "column" else (a, 1)
            set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
            self.register_parameter(f"{name}_A", a)
            self.register_parameter(f"{name}_B", b)

    def pair(self, name: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"{name}_A"), getattr(self, f"{name}_B")

    def forward(self, x: Tensor) -> Tensor:
        """The delta of the linear's (local) output for its input ``x``. Dropout masks follow the
        input: the same on every TP rank for a replicated input (column), each rank's own (the
        tensor-parallel RNG) for a row adapter's shard of it."""
        if self.kind == "row" and isinstance(self.dropout, nn.Dropout):
            with get_cuda_rng_tracker().fork():
                x = self.dropout(x)
        else:
            x = self.dropout(x)
        if self.kind == "row":
            a, b = self.pair(self.targets[0])
            return (reduce_from_tensor_model_parallel_region(x @ a.t()) @ b.t()) * self.scale
        deltas = {name: (copy_to_tensor_model_parallel_region(x @ a.t()) @ b.t()) * self.scale
                  for name, (a, b) in ((n, self.pair(n)) for n in self.targets)}
        return self._fuse([deltas[n] if n in deltas else x.new_zeros(*x.shape[:-1], self.layout[n][0])
                           for n in self.layout], dim=-1)

    def _fuse(self, parts: list[Tensor], dim: int) -> Tensor:
        """Per-projection tensors (along ``dim``) -> the fused linear's layout."""
        if self.groups == 1:
            return torch.cat(parts, dim=dim)
        dim = dim % parts[0].dim()
        grouped = [p.unflatten(dim, (self.groups, -1)) for p in parts]
        return torch.cat(grouped, dim=dim + 1).flatten(dim, dim + 1)

    def hook(self, module: nn.Module, args: tuple, output: tuple[Tensor, Tensor | None]) -> tuple:
        """Forward hook of the base linear: (output + delta, bias)."""
        if not self.enabled:
            return output
        out, bias = output
        return out + self(adapter_input(module, args[0])).to(out.dtype), bias

    @torch.no_grad()
    def merged(self, weight: Tensor) -> Tensor:
        """The base's local weight shard plus scale * B @ A, in the base's layout and dtype."""
        deltas = {n: (b @ a) * self.scale for n, (a, b) in ((n, self.pair(n)) for n in self.targets)}
        parts = [deltas[n] if n in deltas else weight.new_zeros(self.layout[n]) for n in self.layout]
        delta = parts[0] if self.kind == "row" else self._fuse(parts, dim=0)
        return weight + delta.to(weight.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        axes = {f"{n}_B": 0 for n in self.targets} if self.kind == "column" else {f"{n}_A": 1 for n in self.targets}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                   sharded_offsets)


def adapter_input(linear: nn.Module, x: Tensor) -> Tensor:
    """What ``linear``'s weight multiplies when it is called on ``x``: ``x`` itself, or, for a
    linear with its input norm inside (Transformer Engine's ``LayerNormLinear``: ``layer_norm_weight``,
    ``normalization``, ``eps``, ``zero_centered_gamma``), ``x`` normalised as that norm does it (in
    fp32, cast back to ``x``'s dtype). Megatron builds those modules with ``return_layernorm_output=False``,
    so the normalised input is not returned and is formed again here (one norm per adapted linear)."""
    gamma = getattr(linear, "layer_norm_weight", None)
    if gamma is None:
        return x
    gamma = gamma.float() + 1 if linear.zero_centered_gamma else gamma.float()
    xf = x.float()
    if linear.normalization == "RMSNorm":
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + linear.eps) * gamma
    else:
        normed = F.layer_norm(xf, (xf.shape[-1],), gamma, linear.layer_norm_bias.float(), linear.eps)
    return normed.to(x.dtype)


# (module holding the linear, linear, adapters' name, kind, projections in fused order)
_SITES = (("self_attention", "linear_qkv", "lora_qkv", "column", ("q", "k", "v")),
          ("self_attention", "linear_proj", "lora_proj", "row", ("o",)),
          ("mlp", "linear_fc1", "lora_fc1", "column", ("gate", "up")),
          ("mlp", "linear_fc2", "lora_fc2", "row", ("down",)))


def add_adapters(chunks: Sequence[nn.Module], cfg: LoraConfig, seed: int) -> None:
    """Freeze every parameter of ``chunks`` and give each targeted projection an adapter."""
    for chunk in chunks:
        tp, tp_rank = chunk.groups.tp_size, chunk.groups.tp_rank
        if chunk.config.sequence_parallel:
            raise NotImplementedError("LoRA adapters with sequence parallelism (their inputs and outputs are "
                                      "sequence shards there): train with sequence_parallel off")
        for p in chunk.parameters():
            p.requires_grad_(False)
        arch = chunk.arch
        hf = arch.hf_config
        groups = hf.num_key_value_heads or hf.num_attention_heads
        per_group, d, h, ffn = hf.num_attention_heads // groups, arch.head_dim, hf.hidden_size, hf.intermediate_size
        q = groups * per_group * d
        full = {"q": (q, h), "k": (groups * d, h), "v": (groups * d, h), "o": (h, q),
                "gate": (ffn, h), "up": (ffn, h), "down": (h, ffn)}
        for layer in chunk.decoder.layers:
            number = layer.layer_number - 1  # global, 0-based
            for parent_name, linear_name, name, kind, fused in _SITES:
                targets = [p for p in fused if p in cfg.targets]
                if not targets:
                    continue
                layout = {p: (full[p][0] // tp, full[p][1]) if kind == "column" else (full[p][0], full[p][1] // tp)
                          for p in fused}
                adapters = LinearAdapters(kind, layout, targets, cfg.r, cfg.scale, cfg.dropout,
                                          groups=groups // tp if name == "lora_qkv" else 1)
                adapters.to(device=next(chunk.parameters()).device, dtype=chunk.config.params_dtype)
                for p in targets:
                    _init_a(adapters.pair(p)[0], full[p][1], seed, number, p, kind, tp_rank)
                parent = getattr(layer, parent_name)
                parent.add_module(name, adapters)
                getattr(parent, linear_name).register_forward_hook(adapters.hook)


@torch.no_grad()
def _init_a(a: Tensor, fan_in: int, seed: int, layer: int, projection: str, kind: str, tp_rank: int) -> None:
    """PEFT's Kaiming-uniform A drawn on the full [r, in] shape from its own generator; a row
    adapter keeps this rank's columns."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 17 + PROJECTIONS.index(projection))
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [r, fan_in]
    full = torch.empty(a.shape[0], fan_in).uniform_(-bound, bound, generator=generator)
    cols = a.shape[1]
    a.copy_(full[:, tp_rank * cols:(tp_rank + 1) * cols] if kind == "row" else full)


def adapters_of(chunks: Sequence[nn.Module]) -> Iterator[LinearAdapters]:
    for chunk in chunks:
        yield from (m for m in chunk.modules() if isinstance(m, LinearAdapters))


def has_adapters(chunks: Sequence[nn.Module]) -> bool:
    return next(adapters_of(chunks), None) is not None


@contextmanager
def adapters_disabled(chunks: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block the chunks compute the base model (every adapter off)."""
    adapters = list(adapters_of(chunks))
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True


def merged_weights(chunk: nn.Module) -> dict[str, Callable[[], Tensor]]:
    """Megatron parameter name -> its merged local value (computed when called), for every adapted linear."""
    out = {}
    for name, module in chunk.named_modules():
        for parent_name, linear_name, lora_name, _, _ in _SITES:
            if name.endswith(parent_name) and isinstance(getattr(module, lora_name, None), LinearAdapters):
                adapters, weight = getattr(module, lora_name), getattr(module, linear_name).weight
                out[f"{name}.{linear_name}.weight"] = functools.partial(adapters.merged, weight)
    return out


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name
