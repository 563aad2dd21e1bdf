"""Per-step metrics: phase timers, rollout statistics, peak memory, and their reduction over ranks."""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_opsd.opsd.loss import LossConfig, dense_token_divergence
from megatron_opsd.platform import current_device
from megatron_opsd.rollout.engine import Rollout


class PhaseTimer:
    """Wall time per named phase (synchronising the GPU so asynchronous kernels are attributed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def rollout_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Response length mean/max and the fraction of responses cut at max_new_tokens."""
    if not rollouts:
        return {}
    lengths = [len(r.response_ids) for r in rollouts]
    return {
        "response_len_mean": sum(lengths) / len(lengths),
        "response_len_max": float(max(lengths)),
        "truncation_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def all_reduce_stats(sums: dict[str, float], maxes: dict[str, float], group: dist.ProcessGroup | None) -> tuple[dict[str, float], dict[str, float]]:
    """Sum ``sums`` and max ``maxes`` over ``group`` in two collectives (fp64: token counts stay exact)."""
    device = current_device()
    s = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    m = torch.tensor(list(maxes.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(s, group=group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(sums, s.tolist())), dict(zip(maxes, m.tolist()))


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
    zs = _gather_vocab(student_hidden[rows].float() @ student_weight.float().t(), group)[:, : cfg.vocab_size]
    zt = _gather_vocab(teacher_hidden[rows].float() @ teacher_weight.float().t(), group)[:, : cfg.vocab_size]
    agree = (zs.argmax(-1) == zt.argmax(-1)).sum()
    clipped = torch.zeros(())
    if cfg.clip is not None:
        unclipped = cfg.model_copy(update={"clip": None})
        clipped = (dense_token_divergence(zs, zt, cfg) < dense_token_divergence(zs, zt, unclipped)).sum()
    return {"diag_agree": agree.double().cpu(), "diag_clipped": clipped.double().cpu(),
            "diag_tokens": torch.tensor(float(k), dtype=torch.float64)}


def _gather_vocab(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[k, V_local] shards of the TP group -> [k, V_padded]."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
