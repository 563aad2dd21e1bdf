"""Megatron-core models for Hugging Face Llama-family checkpoints.

Build (``groups`` from ``megatron_opsd.parallel.initialize(Layout(tp, pp))``)::

    chunks = build_model(hf_dir_or_config, torch.float32, groups=groups)    # this rank's stage(s)
    load_hf_weights(chunks, hf_dir)                                   # any TP/PP layout

Forward (``LlamaFamilyModel.forward``)::

    mask = attention_mask(segment_ids)                    # bool [B,1,S,S], True = masked
    out = chunk(input_ids, position_ids, mask, output="logits" | "hidden")

- RoPE follows ``position_ids`` [B, S]; packed sequences use a block-diagonal mask from their
  segment ids and keep their own positions. (THD packing with ``PackedSeqParams`` and context
  parallelism are not wired into this forward.)
- With ``sequence_parallel=True`` (GPU), ``output="hidden"`` is this TP rank's sequence shard.
- Non-last pipeline stages return the [S, B, H] activations for the next stage (Megatron's
  schedules pass them via ``set_input_tensor``).
- Last stage: ``output="logits"`` gives vocab-parallel logits [B, S, V_padded/TP];
  ``output="hidden"`` gives the final-norm hidden states [B, S, H]. ``chunk.output_weight()`` is
  this TP rank's output-layer shard [V_padded/TP, H] (the embedding when tied), covering vocab
  rows ``[tp_rank * V_padded/TP, (tp_rank+1) * V_padded/TP)``; rows >= ``chunk.true_vocab_size``
  are padding and must be masked out of any softmax.

Weights: :mod:`megatron_opsd.models.bridge` streams HF tensors in and out
(``load_hf_weights``; ``stage_hf_tensors`` per pipeline stage, ``model_hf_tensors`` the whole
model); :mod:`megatron_opsd.models.checkpoint` saves and loads Megatron dist checkpoints that
reshard across layouts. :class:`ModelConfig` is the ``model`` section of a training config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from pydantic import Field, model_validator
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from megatron_opsd.config import LayoutError
from megatron_opsd.models.architectures import (
    Architecture,
    UnsupportedConfigError,
    layer_spec,
    parse_hf_config,
    transformer_config,
)
from megatron_opsd.models.gpt import LlamaFamilyModel, attention_mask
from megatron_opsd.models.lora import LoraConfig
from megatron_opsd.parallel import ParallelGroups
from megatron_opsd.section import Section


class ModelConfig(Section):
    hf: str | None = Field(default=None, description="Hugging Face directory: config.json + safetensors weights")
    config: dict[str, Any] | None = Field(
        default=None, description="inline HF config (model_type plus its fields) of a randomly initialized model")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="training parameter dtype")
    lora: LoraConfig | None = Field(
        default=None, description="train LoRA adapters on the frozen model (the paper: r 64, alpha 128 on q, k, v, o, "
        "gate, up, down); None: every weight")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.hf is None) == (self.config is None):
            raise ValueError("set exactly one of model.hf (a checkpoint directory) and model.config (an inline HF config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs model_type (e.g. qwen3)")
        if self.hf is not None:
            self._hf_fields()  # a missing or unreadable config.json is this section's error
        return self

    def _hf_fields(self) -> dict[str, Any]:
        path = Path(self.hf) / "config.json"
        if not path.is_file():
            raise ValueError(f"model.hf={self.hf}: no config.json there (a Hugging Face model directory has one)")
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"model.hf: {path} is not readable JSON: {exc}") from None
        if not isinstance(fields, dict):  # pydantic reports a validator's ValueError, not a TypeError
            raise ValueError(f"model.hf: {path} holds a JSON {type(fields).__name__}, not an object")  # noqa: TRY004
        return fields

    def vocab_size(self) -> int | None:
        """From the inline config or the directory's config.json; None when neither says."""
        return (self.config if self.config is not None else self._hf_fields()).get("vocab_size")

    def hf_config(self) -> PretrainedConfig:
        """The directory's HF config, or the inline one (``architectures`` defaults to the model
        type's causal-LM class, e.g. Qwen3ForCausalLM)."""
        if self.hf is not None:
            return load_hf_config(self.hf)
        fields = dict(self.config)
        model_type = fields.pop("model_type")
        fields.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]])
        return AutoConfig.for_model(model_type, **fields)


def load_hf_config(hf_config_or_dir: PretrainedConfig | str | Path) -> PretrainedConfig:
    if isinstance(hf_config_or_dir, PretrainedConfig):
        return hf_config_or_dir
    path = Path(hf_config_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's tensors are stored in (``dtype``/``torch_dtype``; fp32 if unset)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_model(
    hf_config_or_dir: PretrainedConfig | str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    groups: ParallelGroups,
    vocab_divisor: int = 128,
    use_te: bool | None = None,
    spec: ModuleSpec | None = None,
    **config_overrides: Any,
) -> list[LlamaFamilyModel]:
    """This rank's model chunks for the layout of ``groups`` (one chunk per rank).

    Parameters are randomly initialized; load weights with ``bridge.load_hf_weights`` or
    ``checkpoint.load``. ``config_overrides`` go to ``TransformerConfig`` (e.g. recompute); pass
    ``perform_initialization=False`` when every weight is loaded right after (the random init
    dominates a conversion's time on CPU). ``spec``: another layer spec than :func:`layer_spec`'s
    (``use_te`` then does not apply).
    """
    tp, pp = groups.tp_size, groups.pp_size
    arch = parse_hf_config(load_hf_config(hf_config_or_dir), tp=tp, vocab_divisor=vocab_divisor)
    if arch.num_layers % pp:
        raise LayoutError(f"pipeline size {pp} must divide num_hidden_layers={arch.num_layers}")
    if groups.cp_size > 1:
        raise NotImplementedError("LlamaFamilyModel.forward does not split sequences for context parallelism")
    on_cuda = torch.cuda.is_available()
    config = transformer_config(arch, tp=tp, pp=pp, dtype=dtype, use_cpu_initialization=not on_cuda, **config_overrides)
    spec = spec if spec is not None else layer_spec(arch, use_te)
    model = LlamaFamilyModel(config, spec, arch, groups).to(dtype)  # the local spec's torch norms ignore params_dtype
    if on_cuda:
        model.cuda()
    return [model]


__all__ = [
    "Architecture",
    "LlamaFamilyModel",
    "ModelConfig",
    "UnsupportedConfigError",
    "attention_mask",
    "build_model",
    "checkpoint_dtype",
    "load_hf_config",
    "parse_hf_config",
]
