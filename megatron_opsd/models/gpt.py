"""Megatron ``GPTModel`` with an explicit-position, explicit-mask forward that can stop at the
final hidden states.

Two things differ from ``GPTModel.forward``:
- RoPE angles come from ``position_ids`` (transformers' inverse frequencies), not from
  ``arange(seq_len)``, so packed or padded rows see the positions the caller intends;
- on the last pipeline stage ``output="hidden"`` returns the final-norm hidden states instead of
  logits: the OPSD loss multiplies them by the output-layer shard itself, chunk by chunk.

The input embedding's weight gradient is sparse under Megatron DDP (:class:`SparseGradVocabEmbedding`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_opsd.models.architectures import Architecture, rope_inv_freq
from megatron_opsd.parallel import ParallelGroups


class LlamaFamilyModel(GPTModel):
    """One pipeline stage of a Llama-family decoder (see module docstring for the forward)."""

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, arch: Architecture, groups: ParallelGroups):
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.hf_config.max_position_embeddings,
            pre_process=groups.first_stage,
            post_process=groups.last_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            pg_collection=groups.megatron,
        )
        self.arch = arch
        self.groups = groups  # the layout it was built for: what every collective over it runs on
        if self.pre_process:  # Megatron builds the lookup inside LanguageModelEmbedding: re-class it in place
            self.embedding.word_embeddings.__class__ = SparseGradVocabEmbedding
        # A plain attribute, not a buffer: it must stay fp32 when the module is cast to bf16.
        self.inv_freq = rope_inv_freq(arch)

    @property
    def true_vocab_size(self) -> int:
        """Rows of the HF embedding; logits columns at and beyond it are vocabulary padding."""
        return self.arch.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the Megatron embedding across all TP ranks (true size rounded up)."""
        return self.arch.padded_vocab_size

    def rotary_emb(self, position_ids: Tensor) -> Tensor:
        """RoPE angles [S, B, 1, D] for position_ids [B, S] (Megatron's bshd rope layout)."""
        inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids.t().float()[..., None] * inv_freq
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    def output_weight(self) -> Tensor:
        """This TP rank's output-layer weight shard [V_padded / TP, H] (last stage only)."""
        if not self.post_process:
            raise RuntimeError("the output layer lives on the last pipeline stage")
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        *,
        output: Literal["logits", "hidden"] = "logits",
        gather_logits: bool = False,
    ) -> Tensor:
        """Run this stage.

        Args:
            input_ids, position_ids: [B, S] int64 (needed on every stage: RoPE uses the positions).
            attention_mask: bool [B, 1, S, S], True where a query must NOT see a key (Megatron's
                convention); see :func:`megatron_opsd.models.attention_mask`.
            output: on the last stage, ``"logits"`` -> [B, S, V_padded / TP] (vocab-parallel) or
                [B, S, V_padded] with ``gather_logits``; ``"hidden"`` -> final-norm hidden states
                [B, S, H].
        Returns:
            on non-last stages the [S, B, H] activations for the next stage.
        """
        decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids) if self.pre_process else None
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=self.rotary_emb(position_ids),
        )
        if not self.post_process:
            return hidden
        if output == "hidden":
            return hidden.transpose(0, 1).contiguous()
        if output != "logits":
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=gather_logits)
        return logits.transpose(0, 1).contiguous()


class SparseGradVocabEmbedding(VocabParallelEmbedding):
    """Megatron's vocab-parallel lookup, whose weight gradient under Megatron DDP is sparse.

    ``F.embedding``'s dense backward builds a ``[V_local, H]`` gradient, the size of the whole
    embedding, for the few rows a batch looked up: a small model's largest backward transient.
    With ``sparse=True`` the gradient holds those rows only, and DDP's hook adds it to the
    parameter's ``main_grad`` like a dense one. Without DDP (no ``main_grad``: optimizers do not
    take sparse gradients) and in ``deterministic_mode`` this is Megatron's forward unchanged.
    Only ``forward`` differs, so the built module is re-classed: same parameters, same state keys.
    """

    def forward(self, input_: Tensor) -> Tensor:
        if self.deterministic_mode or getattr(self.weight, "main_grad", None) is None:
            return super().forward(input_)
        outside = None
        if self.tp_group.size() > 1:  # ids of other ranks' rows look up row 0, then read as zeros
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            input_ = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        rows = F.embedding(input_, self.weight, sparse=True)
        if outside is not None:
            rows = rows.masked_fill(outside[..., None], 0.0)
        if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], scattered over the sequence
            return reduce_scatter_to_sequence_parallel_region(rows.transpose(0, 1).contiguous(), group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(rows, group=self.tp_group)


def attention_mask(segment_ids: Tensor) -> Tensor:
    """Causal, block-diagonal bool mask [B, 1, S, S] (True = masked) from segment ids [B, S].

    Tokens attend to earlier tokens of the same segment only; a plain batch is one segment per
    row (``torch.zeros(B, S)``). Padding should get its own segment id.
    """
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]
