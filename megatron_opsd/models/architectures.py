"""Hugging Face config -> Megatron ``TransformerConfig`` + layer spec for Llama-family decoders.

Supported: LlamaForCausalLM, MistralForCausalLM (without sliding window), Qwen2ForCausalLM,
Qwen3ForCausalLM. Every config field that changes the math is either mapped or checked: a value
the builder cannot reproduce exactly raises :class:`UnsupportedConfigError` naming the field, so a
checkpoint is never silently run with different semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from megatron_opsd.config import ConfigError, LayoutError
from megatron_opsd.models.attention import SDPAttention

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# RoPE variants whose inverse frequencies are static and whose attention scaling is 1, so that
# precomputing transformers' own inv_freq reproduces the checkpoint exactly.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_VOCAB_DIVISOR = 128


class UnsupportedConfigError(ConfigError):
    """An HF config field has a value this builder cannot reproduce exactly."""


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build and convert one model, derived from its HF config."""

    hf_config: PretrainedConfig
    architecture: str
    vocab_size: int  # true vocabulary (HF embedding rows)
    padded_vocab_size: int  # Megatron embedding rows: multiple of divisor x TP
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    head_dim: int
    rope_type: str
    rope_theta: float

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers


def _get(config: PretrainedConfig, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _rope(config: PretrainedConfig) -> dict[str, Any]:
    """RoPE parameters in the transformers 5 layout, also from 4.x ``rope_theta``/``rope_scaling``."""
    params = _get(config, "rope_parameters")
    if params is None:
        params = {"rope_type": "default", "rope_theta": _get(config, "rope_theta", 10000.0)}
        params.update(_get(config, "rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfigError(
            f"unsupported config field rope_parameters={params!r}: per-layer-type RoPE is not supported"
        )
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check(config: PretrainedConfig, field: str, ok: bool, why: str) -> None:
    if not ok:
        raise UnsupportedConfigError(
            f"unsupported config field {field}={_get(config, field)!r} ({config.model_type}): {why}"
        )


def parse_hf_config(config: PretrainedConfig, tp: int = 1, vocab_divisor: int = DEFAULT_VOCAB_DIVISOR) -> Architecture:
    """Validate ``config`` and derive the Megatron-relevant facts; raises on anything unsupported."""
    archs = _get(config, "architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"unsupported config field architectures={archs!r}: expected one of {SUPPORTED_ARCHITECTURES}"
        )
    arch = archs[0]
    _check(config, "hidden_act", _get(config, "hidden_act") == "silu", "only SwiGLU (silu) MLPs are supported")
    _check(config, "mlp_bias", not _get(config, "mlp_bias", False), "MLP biases are not supported")
    qkv_bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM":
        # Llama/Mistral/Qwen3 attention_bias also adds an o_proj bias, which Megatron cannot express
        # without biasing every linear layer.
        _check(
            config, "attention_bias", not _get(config, "attention_bias", False), "attention biases are not supported"
        )
    _check(
        config,
        "pretraining_tp",
        _get(config, "pretraining_tp", 1) == 1,
        "sliced pretraining_tp matmuls are not supported",
    )
    _check(
        config,
        "use_sliding_window",
        not _get(config, "use_sliding_window", False),
        "sliding-window attention is not supported",
    )
    if arch == "MistralForCausalLM":
        _check(
            config,
            "sliding_window",
            _get(config, "sliding_window") is None,
            "sliding-window attention is not supported",
        )
    layer_types = _get(config, "layer_types")
    _check(
        config,
        "layer_types",
        layer_types is None or set(layer_types) == {"full_attention"},
        "only full attention layers are supported",
    )
    _check(
        config,
        "quantization_config",
        _get(config, "quantization_config") is None,
        "quantized checkpoints are not supported",
    )
    _check(config, "attention_dropout", not _get(config, "attention_dropout", 0.0), "attention dropout must be 0")

    rope = _rope(config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"unsupported config field rope_parameters.rope_type={rope['rope_type']!r} ({config.model_type}): "
            f"supported: {SUPPORTED_ROPE_TYPES}"
        )
    partial = rope.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedConfigError(
            f"unsupported config field partial_rotary_factor={partial}: RoPE on part of a head"
        )

    heads, groups = config.num_attention_heads, _get(config, "num_key_value_heads") or config.num_attention_heads
    head_dim = _get(config, "head_dim") or config.hidden_size // heads
    if heads % groups:
        raise UnsupportedConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if groups % tp:
        raise LayoutError(f"tensor parallel size {tp} must divide num_key_value_heads={groups}")
    if config.intermediate_size % tp:
        raise LayoutError(f"tensor parallel size {tp} must divide intermediate_size={config.intermediate_size}")
    multiple = vocab_divisor * tp
    padded = -(-config.vocab_size // multiple) * multiple
    return Architecture(
        hf_config=config,
        architecture=arch,
        vocab_size=config.vocab_size,
        padded_vocab_size=padded,
        tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        head_dim=head_dim,
        rope_type=rope["rope_type"],
        rope_theta=float(rope["rope_theta"]),
    )


def rope_inv_freq(arch: Architecture) -> torch.Tensor:
    """transformers' own inverse frequencies (fp32) for this config, so RoPE matches bit for bit."""
    if arch.rope_type == "default":
        dim = arch.head_dim
        return 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[arch.rope_type](arch.hf_config, torch.device("cpu"))
    assert attention_scaling == 1.0, f"rope type {arch.rope_type} has attention scaling {attention_scaling}"
    return inv_freq.float()


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports, as Megatron sees it (an installed but broken TE is absent)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return HAVE_TE


def transformer_config(
    arch: Architecture,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype,
    use_cpu_initialization: bool,
    **overrides: Any,
) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` equivalent to ``arch``; ``overrides`` pass through
    (e.g. recompute settings), but cannot change the architecture fields set here."""
    cfg = arch.hf_config
    fields = {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": _get(cfg, "num_key_value_heads") or cfg.num_attention_heads,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": cfg.rms_norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "apply_rope_fusion": False,
        "init_method_std": _get(cfg, "initializer_range", 0.02),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu_initialization": use_cpu_initialization,
    }
    clash = sorted(set(fields) & set(overrides))
    if clash:
        raise ValueError(f"overrides may not change architecture fields: {clash}")
    return TransformerConfig(**fields, **overrides)


def layer_spec(arch: Architecture, use_te: bool | None = None) -> ModuleSpec:
    """Transformer Engine layer spec when TE is importable, else Megatron's local (torch) spec; in
    both the core attention is torch's SDPA (:mod:`megatron_opsd.models.attention`).

    The caller passes an explicit mask (block-diagonal causal for packed sequences), so the mask
    type is ``arbitrary``. TE's own core attention takes an arbitrary mask only in its unfused
    backend, which keeps ``[b * heads, s, s]`` scores for backward; SDPA's fused kernels keep O(s).
    """
    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    return spec
