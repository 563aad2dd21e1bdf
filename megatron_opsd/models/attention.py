"""Core attention for Megatron's local (non-Transformer-Engine) layer spec, through torch's
``scaled_dot_product_attention``.

Megatron's ``DotProductAttention`` forms the ``[b, heads, s, s]`` scores and probabilities and keeps
both for backward (and a global buffer the size of the largest scores seen): quadratic memory in the
sequence, which on CPU, where every packed row runs through it, dominates a step's activations. SDPA
picks a fused kernel that keeps only the inputs, the output and one log-sum-exp per query. Same
math, same mask convention, same module slot and parameters.

Which kernel takes a call decides its memory. On CPU the flash kernel takes a boolean mask and
grouped-query heads (``enable_gqa``). On CUDA flash attention refuses masks and the
memory-efficient kernel refuses grouped-query heads, so a masked call with fewer key/value heads
than query heads would fall to the math backend, which forms fp32 ``[b, heads, s, s]`` scores:
there the keys and values are repeated to every query head first (O(s) memory, not O(s^2)).

SDPA's boolean mask marks what a query may see, the inverse of Megatron's: it is inverted once per
mask, not once per layer (every layer receives the same mask tensor, and each would otherwise keep
its own ``[b, 1, s, s]`` inverse for backward).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary


class SDPAttention(DotProductAttention):
    """``DotProductAttention``'s interface and layouts (query ``[sq, b, heads, d]``, key and value
    ``[sk, b, groups, d]``, a bool mask ``[b, 1, sq, sk]`` True where a query must not see a key;
    output ``[sq, b, heads * d]``) computed by SDPA.

    The architectures built here use none of what SDPA would compute differently (the constructor
    refuses them): attention dropout, softmax offsets, sliding windows, query-key layer scaling.
    Every query must see at least one key (a causal mask always lets a token see itself).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        unsupported = {"attention dropout": self.attention_dropout.p != 0.0,
                       "softmax_type": cfg.softmax_type != "vanilla",
                       "window_size": cfg.window_size is not None,
                       "apply_query_key_layer_scaling": cfg.apply_query_key_layer_scaling}
        if any(unsupported.values()):
            raise ValueError(f"SDPAttention does not implement {[k for k, v in unsupported.items() if v]}; "
                             "use Megatron's DotProductAttention for them")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes neither an attention bias nor THD packed-sequence params")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and attention_mask is None
        # [s, b, n, d] -> [b, n, s, d]; SDPA's bool mask marks what a query may see
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None and q.device.type == "cuda":
            k, v = repeat_kv_heads(k, v, q.shape[1])
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attention_mask is None else _visible(attention_mask), is_causal=causal,
            scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)


_VISIBLE = WeakTensorKeyDictionary()  # Megatron mask -> its inverse, as long as the mask lives


def _visible(masked: Tensor) -> Tensor:
    """SDPA's mask (True where a query may see a key) for Megatron's ``masked``, formed once per mask."""
    visible = _VISIBLE.get(masked)
    if visible is None:
        visible = _VISIBLE[masked] = ~masked
    return visible


def repeat_kv_heads(key: Tensor, value: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Keys and values ``[b, groups, s, d]`` repeated to ``heads`` heads, each group's copies side by
    side (query head ``h`` reads group ``h // (heads // groups)``, as ``enable_gqa`` does)."""
    repeats = heads // key.shape[1]
    if repeats == 1:
        return key, value
    return key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
