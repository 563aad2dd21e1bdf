"""Packing properties (hypothesis): every response token once with its target, samples whole,
budgets respected, and the same sample order and placement on the teacher and the student side."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opsd.data.packing import PackingConfig, assign_micro_batches, pack_pairs, split_for_data_parallel
from megatron_opsd.data.prompts import SequencePair


@st.composite
def pairs_and_config(draw):
    n = draw(st.integers(1, 12))
    ids = st.integers(1, 999)
    pairs = []
    for _ in range(n):
        sp, tp = draw(st.integers(1, 20)), draw(st.integers(1, 40))
        response = draw(st.lists(ids, min_size=1, max_size=15))
        pairs.append(SequencePair(tuple(draw(st.lists(ids, min_size=sp, max_size=sp)) + response),
                                  tuple(draw(st.lists(ids, min_size=tp, max_size=tp)) + response), sp, tp))
    pad = draw(st.sampled_from([1, 2, 4, 8]))
    longest_s = max(len(p.student_ids) for p in pairs)
    longest_t = max(len(p.teacher_ids) for p in pairs)
    cfg = PackingConfig(tokens_per_micro_batch=draw(st.integers(longest_s, 3 * longest_s)) + pad - 1,
                        teacher_tokens_per_micro_batch=draw(st.integers(longest_t, 3 * longest_t)) + pad - 1)
    k = draw(st.one_of(st.none(), st.integers(1, 6)))
    return pairs, cfg, pad, k


def _check_side(side, seqs, starts, budget, pad):
    assert side.length <= budget and side.length % pad == 0 and side.tokens.dtype == torch.long
    cu = side.cu_seqlens.tolist()
    assert side.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == side.length
    assert side.num_tokens == sum(len(s) for s in seqs) and side.max_seqlen == max(b - a for a, b in pairwise(cu))
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
@given(pairs_and_config())
def test_packing_properties(case):
    pairs, cfg, pad, k = case
    batches = pack_pairs(pairs, cfg, pad_multiple=pad, pad_id=0, num_micro_batches=k)
    s_budget, t_budget = cfg.budgets(pad)
    placed = [i for mb in batches for i in mb.sample_ids]
    assert sorted(placed) == list(range(len(pairs)))  # every sample exactly once
    fewest = len(assign_micro_batches([len(p.student_ids) for p in pairs], [len(p.teacher_ids) for p in pairs],
                                      s_budget, t_budget))
    assert len(batches) == (fewest if k is None else max(k, fewest))
    for mb in batches:
        chosen = [pairs[i] for i in mb.sample_ids]
        _check_side(mb.student, [p.student_ids for p in chosen], [p.student_response_start for p in chosen], s_budget, pad)
        _check_side(mb.teacher, [p.teacher_ids for p in chosen], [p.teacher_response_start for p in chosen], t_budget, pad)
        # Same samples, same order: row r of both sides predicts the same response token of the same sample.
        assert torch.equal(mb.student.targets, mb.teacher.targets)
        offsets = mb.response_offsets.tolist()
        for j, p in enumerate(chosen):
            assert mb.student.targets[offsets[j]:offsets[j + 1]].tolist() == list(p.response_ids)
    assert sum(mb.num_response_tokens for mb in batches) == sum(p.response_length for p in pairs)


@settings(max_examples=40, deadline=None)
@given(pairs_and_config())
def test_attention_mask_is_block_diagonal_causal(case):
    pairs, cfg, pad, _ = case
    for mb in pack_pairs(pairs, cfg, pad_multiple=pad):
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
    pair = SequencePair((1, 2, 3), (4, 2, 3), 1, 1)
    batches = pack_pairs([pair], PackingConfig(tokens_per_micro_batch=8), pad_multiple=4, num_micro_batches=3)
    assert [mb.sample_ids for mb in batches] == [(0,), (), ()]
    empty = batches[1]
    assert empty.num_response_tokens == 0 and empty.student.length == 4 and empty.student.num_tokens == 0


def test_sample_over_budget_is_an_error():
    pair = SequencePair((1,) * 5 + (2,), (1,) * 9 + (2,), 5, 9)
    with pytest.raises(ValueError, match=r"sample 0 \(6 student / 10 teacher tokens\) exceeds"):
        pack_pairs([pair], PackingConfig(tokens_per_micro_batch=8))
    with pytest.raises(ValueError, match="exceeds"):  # a budget of 9 rounds down to 8 for TP padding of 4
        pack_pairs([SequencePair((1,) * 8 + (2,), (1, 2), 8, 1)], PackingConfig(tokens_per_micro_batch=9), pad_multiple=4)


def test_thd_params():
    mb = pack_pairs([SequencePair((1, 2, 3), (4, 5, 2, 3), 1, 2)], PackingConfig(tokens_per_micro_batch=8), pad_multiple=4)[0]
    params = mb.teacher.packed_seq_params()
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 4] and params.max_seqlen_q == 4
    assert mb.student.cu_seqlens.tolist() == [0, 3, 4]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=40), st.integers(1, 8))
def test_data_parallel_split_is_a_balanced_partition(costs, dp):
    ranks = split_for_data_parallel(costs, dp)
    assert len(ranks) == dp and sorted(i for r in ranks for i in r) == list(range(len(costs)))
    loads = [sum(costs[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= max(costs, default=0)
