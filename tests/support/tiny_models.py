"""Tiny random Hugging Face checkpoints built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

# vocab 1000 is not a multiple of the padding divisor; 4 query heads share 2 KV groups (GQA).
_COMMON = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        architectures=["LlamaForCausalLM"],
    ),
    "qwen2": Qwen2Config(
        **_COMMON,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        architectures=["Qwen2ForCausalLM"],
    ),
    "qwen3": Qwen3Config(
        **_COMMON, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6, architectures=["Qwen3ForCausalLM"]
    ),
    "qwen3_untied": Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]),
}


def save_tiny_model(name: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Random model ``name`` saved as safetensors in ``out``; biases and norms are randomized too
    so that a misplaced tensor cannot hide behind an initial value of 0 or 1."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name], dtype=dtype)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(out, max_shard_size="200KB")
    return out
