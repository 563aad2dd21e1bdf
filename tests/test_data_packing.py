"""Packing properties (hypothesis): every response token once with its target and its per-token
values, samples whole, budgets respected, the same sample order and placement on the teacher and
the student side, and one-sided packing for algorithms without a teacher."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opsd.data.batching import split_for_data_parallel
from megatron_opsd.data.packing import PackingConfig, PackingError, assign_micro_batches, pack_samples
from megatron_opsd.data.sample import Sample, SampleLayout


@st.composite
def samples_and_config(draw, two_sided=None):
    n = draw(st.integers(1, 12))
    two_sided = draw(st.booleans()) if two_sided is None else two_sided
    with_logprobs = draw(st.booleans())
    ids = st.integers(1, 999)
    samples = []
    for _ in range(n):
        sp, tp = draw(st.integers(1, 20)), draw(st.integers(1, 40))
        response = tuple(draw(st.lists(ids, min_size=1, max_size=15)))
        samples.append(Sample(
            tuple(draw(st.lists(ids, min_size=sp, max_size=sp))), response,
            teacher_prompt_ids=tuple(draw(st.lists(ids, min_size=tp, max_size=tp))) if two_sided else None,
            rollout_logprobs=tuple(-float(t) / 1000 for t in response) if with_logprobs else None,
            token_extras={"advantage": tuple(float(len(samples)) for _ in response)}))
    pad = draw(st.sampled_from([1, 2, 4, 8]))
    longest_s = max(len(s.student_ids) for s in samples)
    longest_t = max(len(s.teacher_ids or ()) for s in samples)
    cfg = PackingConfig(tokens_per_micro_batch=draw(st.integers(longest_s, 3 * longest_s)) + pad - 1,
                        teacher_tokens_per_micro_batch=draw(st.integers(max(longest_t, 1), 3 * max(longest_t, 1))) + pad - 1)
    k = draw(st.one_of(st.none(), st.integers(1, 6)))
    return samples, cfg, pad, k


def _check_side(side, seqs, starts, budget, pad):
    assert side.length <= budget and side.length % pad == 0 and side.tokens.dtype == torch.long
    cu = side.cu_seqlens.tolist()
    assert side.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == side.length
    assert side.num_tokens == sum(len(s) for s in seqs)
    assert len(cu) - 1 in (len(seqs), len(seqs) + 1)  # one segment per sample (+ the tail padding)
    predict, targets = side.predict_positions.tolist(), side.targets.tolist()
    r = 0
    for k, (seq, start) in enumerate(zip(seqs, starts)):
        a, b = cu[k], cu[k + 1]
        assert side.tokens[a:b].tolist() == list(seq)  # the whole sample, contiguous, never split
        assert side.position_ids[a:b].tolist() == list(range(len(seq)))
        for p in range(start, len(seq)):
            assert predict[r] == a + p - 1 and targets[r] == seq[p] and side.tokens[predict[r] + 1] == seq[p]
            r += 1
    assert r == len(predict) == len(targets)
    if len(cu) - 1 > len(seqs):
        assert side.position_ids[cu[-2]:].tolist() == list(range(cu[-1] - cu[-2]))


@settings(max_examples=150, deadline=None)
@given(samples_and_config())
def test_packing_properties(case):
    samples, cfg, pad, k = case
    batches = pack_samples(samples, cfg, pad_multiple=pad, pad_id=0, num_micro_batches=k)
    s_budget, t_budget = cfg.budgets(pad)
    two_sided = samples[0].teacher_prompt_ids is not None
    placed = [i for mb in batches for i in mb.sample_ids]
    assert sorted(placed) == list(range(len(samples)))  # every sample exactly once
    fewest = len(assign_micro_batches([len(s.student_ids) for s in samples],
                                      [len(s.teacher_ids) for s in samples] if two_sided else None, s_budget, t_budget))
    assert len(batches) == (fewest if k is None else max(k, fewest))
    for mb in batches:
        chosen = [samples[i] for i in mb.sample_ids]
        _check_side(mb.student, [s.student_ids for s in chosen], [len(s.prompt_ids) for s in chosen], s_budget, pad)
        if two_sided:
            _check_side(mb.teacher, [s.teacher_ids for s in chosen], [len(s.teacher_prompt_ids) for s in chosen],
                        t_budget, pad)
            # Same samples, same order: row r of both sides predicts the same response token of the same sample.
            assert torch.equal(mb.student.targets, mb.teacher.targets)
        else:
            assert mb.teacher is None
        offsets = mb.response_offsets.tolist()
        assert sorted(mb.per_token) == sorted(samples[0].per_token)
        for j, s in enumerate(chosen):
            rows = slice(offsets[j], offsets[j + 1])
            assert mb.student.targets[rows].tolist() == list(s.response_ids)
            for name, values in s.per_token.items():  # per-token values travel row by row with their targets
                assert mb.per_token[name][rows].tolist() == pytest.approx(list(values))
    assert sum(mb.num_response_tokens for mb in batches) == sum(len(s.response_ids) for s in samples)


@settings(max_examples=40, deadline=None)
@given(samples_and_config(two_sided=True))
def test_attention_mask_is_block_diagonal_causal(case):
    samples, cfg, pad, _ = case
    for mb in pack_samples(samples, cfg, pad_multiple=pad):
        for side in (mb.student, mb.teacher):
            mask = side.attention_mask()
            assert mask.shape == (1, 1, side.length, side.length) and mask.dtype == torch.bool
            cu = side.cu_seqlens.tolist()
            seg = [k for k in range(len(cu) - 1) for _ in range(cu[k], cu[k + 1])]
            expect = torch.tensor([[not (seg[i] == seg[j] and j <= i) for j in range(side.length)] for i in range(side.length)])
            assert torch.equal(mask[0, 0], expect)


def test_ffd_uses_few_micro_batches():
    lengths = [6, 5, 4, 3, 2, 2, 1, 1]  # sums to 24: three full micro-batches of 8
    groups = assign_micro_batches(lengths, lengths, 8, 8)
    assert len(groups) == 3 and all(sum(lengths[i] for i in g) == 8 for g in groups)
    assert assign_micro_batches(lengths, None, 8, 1) == groups  # without a teacher side only the student budget binds


def test_teacher_budget_binds_jointly():
    # Students fit two per micro-batch, teachers only one: pairing must follow the teacher.
    groups = assign_micro_batches([4, 4], [7, 7], 8, 10)
    assert groups == [[0], [1]]


def test_fixed_number_of_micro_batches_splits_then_pads_with_empty_ones():
    groups = assign_micro_batches([3, 3, 3, 3], [3, 3, 3, 3], 12, 12, num_micro_batches=2)
    assert sorted(map(len, groups)) == [2, 2]
    # Worst-fit placement would need a third micro-batch here; splitting first-fit's two never does.
    lengths = [5, 5, 4, 4, 2]
    groups = assign_micro_batches(lengths, lengths, 10, 10, num_micro_batches=2)
    assert len(groups) == 2 and sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert len(assign_micro_batches(lengths, lengths, 10, 10, num_micro_batches=4)) == 4
    sample = Sample((1,), (2, 3), teacher_prompt_ids=(4,))
    batches = pack_samples([sample], PackingConfig(tokens_per_micro_batch=8), pad_multiple=4, num_micro_batches=3)
    assert [mb.sample_ids for mb in batches] == [(0,), (), ()]
    empty = batches[1]
    assert empty.num_response_tokens == 0 and empty.student.length == 4 and empty.student.num_tokens == 0


def test_a_rank_without_samples_packs_padding_with_the_steps_layout():
    layout = SampleLayout(two_sided=True, per_token=("rollout_logprobs",))
    (mb,) = pack_samples([], PackingConfig(tokens_per_micro_batch=8), pad_multiple=2, num_micro_batches=1, layout=layout)
    assert mb.teacher is not None and mb.teacher.length == 2 and mb.per_token["rollout_logprobs"].numel() == 0
    with pytest.raises(PackingError, match="packed as"):
        pack_samples([Sample((1,), (2,))], PackingConfig(tokens_per_micro_batch=8), layout=layout)


def test_sample_over_budget_is_an_error():
    sample = Sample((1,) * 5, (2,), teacher_prompt_ids=(1,) * 9)
    with pytest.raises(ValueError, match=r"sample 0 \(6 student / 10 teacher tokens\) exceeds"):
        pack_samples([sample], PackingConfig(tokens_per_micro_batch=8))
    with pytest.raises(ValueError, match=r"sample 0 \(9 tokens\) exceeds the micro-batch budget \(8\)"):
        # a budget of 9 rounds down to 8 for TP padding of 4
        pack_samples([Sample((1,) * 8, (2,))], PackingConfig(tokens_per_micro_batch=9), pad_multiple=4)


def test_segments_of_a_padded_row():
    mb = pack_samples([Sample((1,), (2, 3), teacher_prompt_ids=(4, 5))], PackingConfig(tokens_per_micro_batch=8),
                      pad_multiple=4)[0]
    assert mb.teacher.cu_seqlens.tolist() == [0, 4] and mb.student.cu_seqlens.tolist() == [0, 3, 4]
    assert mb.student.segment_ids.tolist() == [0, 0, 0, 1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=40), st.integers(1, 8))
def test_data_parallel_split_is_a_balanced_partition(costs, dp):
    ranks = split_for_data_parallel(costs, dp)
    assert len(ranks) == dp and sorted(i for r in ranks for i in r) == list(range(len(costs)))
    loads = [sum(costs[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= max(costs, default=0)
