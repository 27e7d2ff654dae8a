"""poet_jax.data.packing: row layout (hand-worked), first-fit packing and its errors (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from poet_jax.data import packing
from poet_jax.data.packing import PackingError, first_fit, make_packed_batch, pack_epoch, pack_pairs
from poet_jax.data.tokenize import Example


def ex(p, c, r):
    return Example(np.asarray(p, np.int32), np.asarray(c, np.int32), np.asarray(r, np.int32))


EXS = [ex([10, 11, 12], [20, 21], [30, 31, 32]), ex([40], [50, 51, 52], [60])]


def test_shared_prompt_layout_by_hand():
    b = make_packed_batch(EXS, np.array([[0, 1]]), pad_id=0, row_length=16, shared_prompt=True)
    # pair 0: [10 11 12 | 20 21 | 30 31 32], pair 1: [40 | 50 51 52 | 60], then 3 pads
    np.testing.assert_array_equal(b.input_ids[0], [10, 11, 12, 20, 21, 30, 31, 32, 40, 50, 51, 52, 60, 0, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 1, 0, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [1] * 8 + [2] * 5 + [0] * 3)
    np.testing.assert_array_equal(b.branch_ids[0], [0, 0, 0, 1, 1, 2, 2, 2, 0, 1, 1, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(b.pair_slot[0], [0] * 8 + [1] * 5 + [-1] * 3)
    # logits at the last prompt slot predict the first token of BOTH responses
    np.testing.assert_array_equal(b.chosen_targets[0],
                                  [-1, -1, 20, 21, -1, -1, -1, -1, 50, 51, 52, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(b.rejected_targets[0],
                                  [-1, -1, 30, -1, -1, 31, 32, -1, 60, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(b.chosen_mask[0], b.chosen_targets[0] >= 0)
    np.testing.assert_array_equal(b.rejected_mask[0], b.rejected_targets[0] >= 0)
    np.testing.assert_array_equal(b.pair_valid, [[1, 1]])
    assert b.num_real_tokens == 13 and b.num_pairs == 2


def test_two_row_layout_by_hand():
    b = make_packed_batch(EXS, np.array([[1, -1], [0, -1]]), pad_id=7, bucket_lengths=(4, 8, 16),
                          shared_prompt=False)
    assert b.length == 16  # pair 0 needs 2*3 + 2 + 3 = 11 slots -> bucket 16
    np.testing.assert_array_equal(b.input_ids[1, :11], [10, 11, 12, 20, 21, 10, 11, 12, 30, 31, 32])
    np.testing.assert_array_equal(b.positions[1, :11], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b.segment_ids[1], [1] * 5 + [2] * 6 + [0] * 5)
    np.testing.assert_array_equal(np.nonzero(b.chosen_mask[1])[0], [2, 3])
    np.testing.assert_array_equal(np.nonzero(b.rejected_mask[1])[0], [7, 8, 9])
    np.testing.assert_array_equal(b.rejected_targets[1, 7:10], [30, 31, 32])
    np.testing.assert_array_equal(b.input_ids[0, :6], [40, 50, 51, 52, 40, 60])
    assert (b.input_ids[0, 6:] == 7).all()
    np.testing.assert_array_equal(b.pair_valid, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(b.example_index, [[1, -1], [0, -1]])


def test_first_fit_capacity_and_coverage():
    rs = np.random.RandomState(0)
    lengths = rs.randint(1, 40, size=200)
    for max_open in (None, 4):
        rows = first_fit(lengths, 64, 3, max_open_rows=max_open)
        flat = sorted(i for r in rows for i in r)
        assert flat == list(range(200))
        assert all(len(r) <= 3 and lengths[r].sum() <= 64 for r in rows)
    # first fit by hand: 30 -> row0, 40 -> row1, 20 -> row0 (50), 24 -> row1 (64), 14 -> row0 (64)
    assert first_fit([30, 40, 20, 24, 14], 64, 4) == [[0, 2, 4], [1, 3]]


def test_pack_pairs_and_epoch():
    rs = np.random.RandomState(1)
    exs = [ex(rs.randint(3, 9, rs.randint(1, 8)), rs.randint(3, 9, rs.randint(1, 8)), rs.randint(3, 9, rs.randint(1, 8)))
           for _ in range(30)]
    plan = pack_pairs(exs, range(30), num_rows=8, row_length=64, max_pairs_per_row=4)
    assert plan.shape == (8, 4)
    assert sorted(plan[plan >= 0].tolist()) == list(range(30))
    auto = pack_pairs(exs, range(30), num_rows=None, row_length=64, max_pairs_per_row=4, row_multiple=4)
    assert auto.shape[0] % 4 == 0 and (auto >= 0).any(axis=1).sum() > auto.shape[0] - 4
    plans = pack_epoch(exs, rs.permutation(30), rows_per_batch=3, row_length=40, max_pairs_per_row=3)
    allp = np.concatenate(plans)
    assert sorted(allp[allp >= 0].tolist()) == list(range(30))
    for p in plans:
        b = make_packed_batch(exs, p, 0, row_length=40)
        assert b.input_ids.shape == (3, 40)
        np.testing.assert_array_equal(b.pair_valid, p >= 0)
        # each scored chosen / rejected token count equals the response length
        for r in range(3):
            for m in range(3):
                if p[r, m] >= 0:
                    e = exs[p[r, m]]
                    assert b.chosen_mask[r][b.pair_slot[r] == m].sum() == len(e.chosen_ids)
                    assert b.rejected_mask[r][b.pair_slot[r] == m].sum() == len(e.rejected_ids)


def test_errors_name_the_culprit():
    with pytest.raises(PackingError, match="example 0 needs 8 row slots"):
        pack_pairs(EXS, [0, 1], num_rows=2, row_length=7, max_pairs_per_row=2)
    with pytest.raises(PackingError, match="need 2 rows"):
        pack_pairs(EXS, [0, 1], num_rows=1, row_length=10, max_pairs_per_row=2)
    with pytest.raises(PackingError, match="empty prompt"):
        make_packed_batch([ex([], [1], [2])], np.array([[0]]), 0)
    with pytest.raises(PackingError, match="max_pairs_per_row"):
        first_fit([1], 8, 0)
    assert issubclass(PackingError, ValueError)
    assert packing.pair_tokens(EXS[0], True) == 8 and packing.pair_tokens(EXS[0], False) == 11


@pytest.mark.parametrize("shared", [True, False])
def test_packed_flop_terms_count_the_block_mask(shared):
    """The trainer's FLOP count of packed rows (tokens, attended (query, key) pairs per sequence)
    equals counting the True entries of the causal block mask the model applies."""
    from poet_jax.models.transformer import segment_attention_mask
    from poet_jax.train.flops import shared_prompt_attended
    from poet_jax.train.loop import packed_sequence_sizes

    rng = np.random.default_rng(3)
    exs = [ex(rng.integers(1, 9, rng.integers(1, 6)), rng.integers(1, 9, rng.integers(1, 7)),
              rng.integers(1, 9, rng.integers(1, 7))) for _ in range(6)]
    b = make_packed_batch(exs, np.array([[0, 1, 2], [3, 4, 5]]), pad_id=0, row_length=64, shared_prompt=shared)
    tokens, attended = packed_sequence_sizes(b.segment_ids, b.branch_ids)
    mask = np.asarray(segment_attention_mask(b.segment_ids, b.branch_ids)) & np.tril(np.ones((64, 64), bool))
    real = b.segment_ids > 0
    assert tokens.sum() == real.sum() == sum(len(e.prompt_ids) * (1 if shared else 2) + len(e.chosen_ids)
                                             + len(e.rejected_ids) for e in exs)
    assert attended.sum() == (mask & real[:, :, None] & real[:, None, :]).sum()
    if shared:  # one sequence per pair, in pair order
        want = [shared_prompt_attended(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in exs]
        np.testing.assert_array_equal(attended, want)


def test_balanced_packing_and_cut_rows():
    """balance=True keeps every pair exactly once and makes the fullest row no longer than first fit
    does; to_packed_micro_batches then cuts the rows to a multiple of length_multiple."""
    from poet_jax.data.packing import pair_tokens, row_fill
    from poet_jax.train.loop import to_packed_micro_batches

    rng = np.random.default_rng(7)
    exs = [ex(rng.integers(1, 9, rng.integers(5, 60)), rng.integers(1, 9, rng.integers(5, 90)),
              rng.integers(1, 9, rng.integers(5, 90))) for _ in range(40)]
    for start in range(0, 40, 8):
        idx = list(range(start, start + 8))
        ff = pack_pairs(exs, idx, num_rows=None, row_length=400, max_pairs_per_row=4)
        bal = pack_pairs(exs, idx, num_rows=None, row_length=400, max_pairs_per_row=4, balance=True)
        assert bal.shape == ff.shape
        assert sorted(bal[bal >= 0].tolist()) == idx
        assert (bal >= 0).sum(axis=1).max() <= 4
        assert row_fill(exs, bal) <= row_fill(exs, ff) <= 400
        out = to_packed_micro_batches(exs, np.asarray(idx), None, 2, 0, shared_prompt=True, max_pairs_per_row=4,
                                      row_length=400, length_multiple=64)
        length = out["input_ids"].shape[-1]
        fill = max(row_fill(exs, p) for p in out["example_index"])
        assert length % 64 == 0 and fill <= length < fill + 64
        # every pair's tokens are in the cut rows: real slots == sum of pair sizes
        assert (out["segment_ids"] > 0).sum() == sum(pair_tokens(exs[i], True) for i in idx)
        # rows padded up to a multiple of the data-parallel ways: the pairs spread over all of them
        wide = pack_pairs(exs, idx, num_rows=None, row_length=400, max_pairs_per_row=4, row_multiple=8,
                          balance=True)
        assert wide.shape[0] == 8 and sorted(wide[wide >= 0].tolist()) == idx
        assert row_fill(exs, wide) <= row_fill(exs, bal)
        assert row_fill(exs, wide) == max(pair_tokens(exs[i], True) for i in idx)  # 8 pairs, 8 rows: one each
