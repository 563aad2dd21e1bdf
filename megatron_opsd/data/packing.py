"""Pack samples into micro-batches under a token budget, one side or two.

A sample is the student sequence (prompt + response) and, with a teacher side, the teacher
sequence (teacher prompt + the same response). The loss compares, for every response token, the
student's and the teacher's outputs at the positions that predict it, so teacher micro-batch ``j``
and student micro-batch ``j`` must hold exactly the same samples in the same order. Packing the
two sides separately cannot promise that (teacher sequences are longer by the solution, so
first-fit would group them differently); instead each sample is one item with two sizes, placed
by a two-dimensional first-fit-decreasing: it goes into a micro-batch only if it fits BOTH the
student budget and the teacher budget. The response-predicting positions of both sides are then
listed in the same sample order, so row ``r`` of the teacher hidden states and row ``r`` of the
student hidden states predict the same token (``MicroBatch.student.targets ==
MicroBatch.teacher.targets``). Without a teacher side only the student budget applies.

Each side of a micro-batch is one packed row with a block-diagonal causal mask and position ids
restarting at 0 per segment (RoPE then gives every segment the attention it would have alone);
``cu_seqlens`` marks the segments. (Transformer Engine's THD format would take the same segments;
the model's forward does not take it yet, so the dense mask is what runs, on every platform.) The
row is padded at the end to a multiple of ``pad_multiple`` (TP with sequence parallelism); the
padding is its own segment so it never mixes with real tokens.

Per-token values (:attr:`Sample.per_token`: the rollout's log-probs, advantages, ...) are
concatenated in the same order as the targets, so the loss reads them row by row.
Data parallelism is ``data/batching.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from pydantic import Field

from megatron_opsd.data.sample import Sample, SampleLayout, common_layout
from megatron_opsd.errors import UserError
from megatron_opsd.section import Section


class PackingConfig(Section):
    tokens_per_micro_batch: int = Field(default=8192, gt=0, description="student tokens per packed micro-batch")
    teacher_tokens_per_micro_batch: int | None = Field(default=None, gt=0, description="default: tokens_per_micro_batch")

    def budgets(self, pad_multiple: int = 1) -> tuple[int, int]:
        """(student, teacher) budgets rounded down to ``pad_multiple`` so padding never exceeds them."""
        teacher = self.teacher_tokens_per_micro_batch or self.tokens_per_micro_batch
        return tuple(b - b % pad_multiple for b in (self.tokens_per_micro_batch, teacher))


class PackingError(UserError, ValueError):
    """Samples that cannot be packed as asked (one longer than the micro-batch budget)."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def assign_micro_batches(
    student_lengths: Sequence[int], teacher_lengths: Sequence[int] | None, student_budget: int, teacher_budget: int,
    num_micro_batches: int | None = None,
) -> list[list[int]]:
    """Sample indices per micro-batch; every sample fits both budgets in its micro-batch
    (``teacher_lengths=None``: no teacher side, only the student budget applies).

    First-fit-decreasing on each sample's larger budget fraction gives the fewest micro-batches, m.
    With ``num_micro_batches=k > m`` the fullest micro-batches are split in two (a subset of a
    micro-batch that fits still fits) and then padding-only ones are added, so the result has
    exactly ``max(k, m)`` micro-batches. Micro-batches list samples in index order.
    """
    one_sided = teacher_lengths is None
    if one_sided:  # a zero-length teacher side never binds
        teacher_lengths = [0] * len(student_lengths)
    if len(student_lengths) != len(teacher_lengths):
        raise PackingError("student and teacher length lists differ in size")
    for i, (s, t) in enumerate(zip(student_lengths, teacher_lengths)):
        if s > student_budget or t > teacher_budget:
            sizes, budgets = (f"{s}", f"{student_budget}") if one_sided else \
                (f"{s} student / {t} teacher", f"{student_budget} / {teacher_budget}")
            raise PackingError(f"sample {i} ({sizes} tokens) exceeds the micro-batch budget ({budgets}); raise "
                               f"packing.tokens_per_micro_batch" + ("" if one_sided else " (or its teacher_ twin)"))

    def size(i: int) -> float:
        return max(student_lengths[i] / student_budget, teacher_lengths[i] / teacher_budget)

    def fill(group: list[int]) -> float:
        return max(sum(student_lengths[i] for i in group) / student_budget,
                   sum(teacher_lengths[i] for i in group) / teacher_budget)

    bins: list[list[int]] = []
    loads: list[list[int]] = []
    for i in sorted(range(len(student_lengths)), key=lambda i: (-size(i), i)):
        s, t = student_lengths[i], teacher_lengths[i]
        b = next((b for b, (ls, lt) in enumerate(loads) if ls + s <= student_budget and lt + t <= teacher_budget), None)
        if b is None:
            bins.append([])
            loads.append([0, 0])
            b = len(bins) - 1
        bins[b].append(i)
        loads[b][0] += s
        loads[b][1] += t
    while num_micro_batches is not None and len(bins) < num_micro_batches:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            break
        b = max(splittable, key=lambda b: (fill(bins[b]), -b))
        halves: list[list[int]] = [[], []]
        for i in sorted(bins[b], key=lambda i: (-size(i), i)):
            min(halves, key=fill).append(i)
        bins[b:b + 1] = halves
    bins += [[] for _ in range((num_micro_batches or 0) - len(bins))]
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PackedSequences:
    """One side (student or teacher) of a micro-batch: segments back to back in one row of length T."""

    tokens: torch.Tensor             # [T] int64, padding = pad_id
    position_ids: torch.Tensor       # [T] int64, 0.. within each segment
    cu_seqlens: torch.Tensor         # [segments + 1] int32; the tail padding is the last segment
    num_tokens: int                  # real (non-pad) tokens
    predict_positions: torch.Tensor  # [R] int64: the output at this index predicts targets[r]
    targets: torch.Tensor            # [R] int64 response token ids, samples in MicroBatch order

    @property
    def length(self) -> int:
        return self.tokens.numel()

    @property
    def segment_ids(self) -> torch.Tensor:
        """[T] int64: which segment (sample, or the tail padding) each token belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.cu_seqlens.numel() - 1), self.cu_seqlens.diff().long(), output_size=self.length)

    def attention_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """[1, 1, T, T] bool, True = masked (Megatron's convention): causal within each segment only;
        formed on ``device`` (a GPU builds it there rather than receiving T x T bytes from the host)."""
        segment = self.segment_ids.to(device)
        idx = torch.arange(self.length, device=device)
        allowed = (segment[:, None] == segment[None, :]) & (idx[None, :] <= idx[:, None])
        return (~allowed)[None, None]


@dataclass(frozen=True)
class MicroBatch:
    """Samples ``sample_ids`` (indices into the packed list) on each side, in the same order.

    Sample ``sample_ids[k]`` owns rows ``response_offsets[k]:response_offsets[k+1]`` of each side's
    ``predict_positions`` / ``targets`` and of every ``per_token`` tensor ([R] fp32).
    """

    sample_ids: tuple[int, ...]
    response_offsets: torch.Tensor  # [len(sample_ids) + 1] int64
    student: PackedSequences
    teacher: PackedSequences | None = None
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.teacher is not None and not torch.equal(self.student.targets, self.teacher.targets):
            raise AssertionError("student and teacher response targets differ")
        for name, values in self.per_token.items():
            if values.shape != self.student.targets.shape:
                raise AssertionError(f"per-token {name}: shape {list(values.shape)} for {self.num_response_tokens} targets")

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_offsets[-1])


def _pack_side(seqs: list[tuple[int, ...]], starts: list[int], pad_multiple: int, pad_id: int) -> PackedSequences:
    # Built in numpy: many tiny torch ops cost more in thread-pool overhead than in work.
    lengths = [len(s) for s in seqs]
    used = sum(lengths)
    total = max(round_up(used, pad_multiple), pad_multiple)
    segments = lengths + ([total - used] if total > used else [])
    cu = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(segments, out=cu[1:])
    tokens = np.full(total, pad_id, dtype=np.int64)
    tokens[:used] = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=used)
    position_ids = np.arange(total) - np.repeat(cu[:-1], segments)
    # Response token p of segment k sits at cu[k] + p and is predicted by the output at cu[k] + p - 1.
    predict = np.concatenate([np.arange(cu[k] + r - 1, cu[k] + n - 1) for k, (r, n) in enumerate(zip(starts, lengths))]
                             or [np.zeros(0, dtype=np.int64)])
    return PackedSequences(
        tokens=torch.from_numpy(tokens), position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)), num_tokens=used,
        predict_positions=torch.from_numpy(predict), targets=torch.from_numpy(tokens[predict + 1]))


def pack_samples(
    samples: Sequence[Sample], cfg: PackingConfig, pad_multiple: int = 1, pad_id: int = 0,
    num_micro_batches: int | None = None, layout: SampleLayout | None = None,
) -> list[MicroBatch]:
    """Micro-batches for one rank's samples (see the module docstring for the guarantees).

    All samples share one layout (teacher side or not, the same per-token names); pass the step's
    ``layout`` when this rank may have no samples, so its padding-only micro-batches still have it.
    """
    if layout is None:
        layout = common_layout(samples)
    elif samples and common_layout(samples) != layout:
        raise PackingError(f"samples of layout {common_layout(samples)} packed as {layout}")
    student_budget, teacher_budget = cfg.budgets(pad_multiple)
    groups = assign_micro_batches([len(s.student_ids) for s in samples],
                                  [len(s.teacher_ids) for s in samples] if layout.two_sided else None,
                                  student_budget, teacher_budget, num_micro_batches)
    batches = []
    for group in groups:
        chosen = [samples[i] for i in group]
        offsets = np.cumsum([0] + [len(s.response_ids) for s in chosen])
        teacher = _pack_side([s.teacher_ids for s in chosen], [len(s.teacher_prompt_ids) for s in chosen],
                             pad_multiple, pad_id) if layout.two_sided else None
        values = {name: torch.tensor([v for s in chosen for v in s.per_token[name]], dtype=torch.float32)
                  for name in layout.per_token}
        batches.append(MicroBatch(
            sample_ids=tuple(group), response_offsets=torch.from_numpy(offsets),
            student=_pack_side([s.student_ids for s in chosen], [len(s.prompt_ids) for s in chosen], pad_multiple, pad_id),
            teacher=teacher, per_token=values))
    return batches
