"""The OPSD loss's diagnostics against a float64 reference: top-1 agreement and clipped tokens on evenly
spaced rows."""
from __future__ import annotations

import torch

from megatron_opsd.algorithms.opsd.diagnostics import divergence_diagnostics
from megatron_opsd.algorithms.opsd.divergence import LossConfig, dense_token_divergence


def test_opsd_diagnostics_count_agreement_and_clipped_tokens_on_evenly_spaced_rows():
    torch.manual_seed(0)
    n, hidden, rows, vocab = 37, 16, 50, 45
    student_h = 0.5 * torch.randn(n, hidden)  # a teacher near the student: some rows agree, some clip
    teacher_h, teacher_w = student_h + 0.1 * torch.randn(n, hidden), torch.randn(rows, hidden)
    student_w = teacher_w + 0.1 * torch.randn(rows, hidden)
    student_w[vocab:] *= 100  # padding rows would win every argmax if they were not cut off
    cfg = LossConfig(vocab_size=vocab, clip=0.05)
    sums = divergence_diagnostics(student_h, teacher_h, student_w, teacher_w, cfg, None, max_tokens=20)
    picked = torch.linspace(0, n - 1, 20).long()  # 3 blocks of at most 8
    zs, zt = ((h[picked].double() @ w.double().T)[:, :vocab] for h, w in ((student_h, student_w), (teacher_h, teacher_w)))
    agree = int((zs.argmax(-1) == zt.argmax(-1)).sum())
    clipped = int((dense_token_divergence(zs, zt, cfg) < dense_token_divergence(zs, zt, cfg.model_copy(update={"clip": None}))).sum())
    assert 0 < agree < 20 and 0 < clipped < 20, (agree, clipped)  # neither count is trivially 0 or all
    assert {k: float(v) for k, v in sums.items()} == {"diag_agree": agree, "diag_clipped": clipped, "diag_tokens": 20.0}
