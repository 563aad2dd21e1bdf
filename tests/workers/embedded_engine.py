"""Megatron -> embedded engine through the streaming exporter, at TP=2. Run by tests/test_embedded_engine.py."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.models import attention_mask, build_model
from megatron_opsd.models.bridge import drain, model_hf_tensors
from megatron_opsd.models.forward import forward_only
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.rollout.embedded import EmbeddedEngine
from tests.support.distributed import run_checks
from tests.support.tiny_models import CONFIGS


def _randomize(model: torch.nn.Module) -> None:
    """Peaked weights instead of the 0.02 init; replicated norms get the same values on every TP rank."""
    shared = torch.Generator().manual_seed(0)
    local = torch.Generator().manual_seed(1 + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=shared))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=local))


def check_megatron_export_logits() -> None:
    groups = initialize(Layout(tp=2))
    config = CONFIGS["qwen3"]  # tied embeddings, q/k norms, GQA, vocab 1000 padded to 1024
    chunks = build_model(config, groups=groups)
    _randomize(chunks[0])
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, -1),
             "attention_mask": attention_mask(torch.zeros_like(ids))}
    (megatron_logits,) = forward_only(chunks, [batch], gather_logits=True)
    engine = EmbeddedEngine.from_hf_config(config)
    if ps.get_tensor_model_parallel_rank() != 0:  # the whole model arrives on rank 0
        drain(model_hf_tensors(chunks))
        return
    engine.update_weights(model_hf_tensors(chunks), version=5)
    with torch.no_grad():
        engine_logits = engine.model(ids).logits
    diff = (engine_logits - megatron_logits[..., :config.vocab_size]).abs().max().item()
    assert diff <= 1e-4, f"engine vs Megatron logits: max |diff| {diff:.3e}"
    assert megatron_logits.std() > 0.5, "logits too flat to tell a wrong mapping apart"
    assert engine.weight_version == 5


CHECKS = {"megatron_export_logits": check_megatron_export_logits}

if __name__ == "__main__":
    run_checks(CHECKS)
