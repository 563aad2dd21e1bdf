"""Diagnostics of the OPSD loss on a few tokens per micro-batch: teacher-student top-1 agreement and
how often the per-entry clip bit."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opsd.algorithms.opsd.divergence import LossConfig, dense_token_divergence
from megatron_opsd.models.vocab_parallel import gather_vocab


@torch.no_grad()
def divergence_diagnostics(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    cfg: LossConfig,
    group: dist.ProcessGroup | None,
    max_tokens: int,
) -> dict[str, torch.Tensor]:
    """Teacher-student top-1 agreement and clipped-token count on up to ``max_tokens`` evenly spaced
    response tokens (counts; divide by ``diag_tokens``).

    A token counts as clipped when at least one vocabulary entry's term exceeded tau, i.e. its
    clipped divergence differs from the unclipped one. Full logits are gathered for these few
    tokens only, so the cost stays a small fraction of the loss.
    """
    n = student_hidden.shape[0]
    k = min(n, max_tokens)
    if k == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return {"diag_agree": zero, "diag_clipped": zero, "diag_tokens": zero}
    rows = torch.linspace(0, n - 1, k, device=student_hidden.device).long()
    unclipped = None if cfg.clip is None else cfg.model_copy(update={"clip": None})
    agree = clipped = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    for block in rows.split(8):  # a few [8, V] logits at a time
        zs, zt = (gather_vocab(_logits(h[block], w), group)[:, : cfg.vocab_size]
                  for h, w in ((student_hidden, student_weight), (teacher_hidden, teacher_weight)))
        agree = agree + (zs.argmax(-1) == zt.argmax(-1)).sum()
        if unclipped is not None:
            clipped = clipped + (dense_token_divergence(zs, zt, cfg) < dense_token_divergence(zs, zt, unclipped)).sum()
    return {"diag_agree": agree.double().cpu(), "diag_clipped": clipped.double().cpu(),
            "diag_tokens": torch.tensor(float(k), dtype=torch.float64)}


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``hidden @ W^T``, the matmul in the weights' dtype like the loss's, formed as ``(W h^T)^T``:
    on CPU the output layer as the right-hand operand would be copied (packed) first."""
    return (weight @ hidden.to(weight.dtype).T).T.float()
