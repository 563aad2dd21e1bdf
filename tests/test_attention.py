"""Core attention through SDPA (models/attention.py): the grouped-query inputs it hands the fused
kernels, on the CPU (CUDA's kernel choice is checked by tests/test_models_gpu.py)."""
import torch
import torch.nn.functional as F

from megatron_opsd.models.attention import repeat_kv_heads
from megatron_opsd.models.gpt import attention_mask


def test_repeated_key_value_heads_give_grouped_query_attention():
    """CUDA's memory-efficient kernel takes a mask but not fewer key/value heads than query heads:
    keys and values repeated to every head must give what ``enable_gqa`` and a float64 reference give."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    masked = attention_mask(torch.tensor([[0] * 5 + [1] * 7, [0] * 12]))  # True = masked
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked, enable_gqa=True)
    k4, v4 = repeat_kv_heads(k, v, heads=4)
    assert k4.shape == v4.shape == (2, 4, 12, 8)
    repeated = F.scaled_dot_product_attention(q, k4, v4, attn_mask=~masked)
    torch.testing.assert_close(repeated, grouped)
    heads_of = torch.arange(4) // 2  # query head h reads key/value group h // 2
    scores = (q.double() @ k.double()[:, heads_of].transpose(-1, -2)) / 8 ** 0.5
    reference = scores.masked_fill(masked, float("-inf")).softmax(-1) @ v.double()[:, heads_of]
    torch.testing.assert_close(repeated.double(), reference, rtol=1e-5, atol=1e-6)
    assert repeat_kv_heads(k, v, heads=2) == (k, v)
