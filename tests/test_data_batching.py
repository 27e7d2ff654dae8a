"""Truncation, POET on ids, bucketing, batching, the resumable process-sharded sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from poet_jax.data import (
    BatchSampler, DataConfig, Example, batch_from_plan, build_preference_data, default_bucket_lengths,
    eval_plans, make_batch, poet_truncate_example, row_lengths, truncate_example, truncation_lengths,
)
from poet_jax.losses import poet_mask

HH = "hh_rlhf_harmless_base_test.jsonl.gz"


def _random_examples(n: int, seed: int = 0, max_len: int = 40) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = rng.integers(1, max_len, size=3)
        out.append(Example(
            rng.integers(3, 1000, p).astype(np.int32), rng.integers(3, 1000, c).astype(np.int32),
            rng.integers(3, 1000, r).astype(np.int32), "rand", i,
        ))
    return out


# -- truncation --------------------------------------------------------------------------

def _trl096_reference(prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int):
    """TRL 0.9.6 DPOTrainer.tokenize_row's length logic (truncation_mode="keep_end"), on lists."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected


def test_truncation_matches_trl096_and_fit_rule():
    rng = np.random.default_rng(1)
    for _ in range(500):
        ml = int(rng.integers(8, 64))
        mpl = int(rng.integers(1, ml))
        p, c, r = (list(range(int(n))) for n in rng.integers(1, 80, size=3))
        ex = Example(np.array(p, np.int32), np.array(c, np.int32), np.array(r, np.int32))
        ref = _trl096_reference(p, c, r, ml, mpl)
        t, _, _ = truncate_example(ex, ml, mpl, mode="trl096")
        assert [list(t.prompt_ids), list(t.chosen_ids), list(t.rejected_ids)] == list(ref)
        # "fit": same prompt, responses keep max_length - prompt' tokens
        f, pcut, rcut = truncate_example(ex, ml, mpl, mode="fit")
        assert list(f.prompt_ids) == ref[0]
        pl = len(ref[0])
        if pl + max(len(c), len(r)) > ml:
            assert len(f.chosen_ids) == min(len(c), ml - pl) and len(f.rejected_ids) == min(len(r), ml - pl)
            assert pl + max(len(f.chosen_ids), len(f.rejected_ids)) == ml
        else:
            assert (list(f.chosen_ids), list(f.rejected_ids)) == (c, r)
        assert pcut == (pl < len(p)) and rcut == (len(f.chosen_ids) < len(c) or len(f.rejected_ids) < len(r))
        assert list(f.chosen_ids) == c[: len(f.chosen_ids)]  # responses keep their start
    # closed-form cases: prompt keeps its END
    assert truncation_lengths(100, 50, 30, 128, 64) == (64, 50, 30)
    assert truncation_lengths(100, 90, 30, 128, 64) == (64, 64, 30)
    assert truncation_lengths(100, 90, 30, 128, 64, "trl096") == (64, 64, 30)
    assert truncation_lengths(10, 200, 30, 128, 64, "trl096") == (10, 64, 30)
    assert truncation_lengths(10, 200, 30, 128, 64, "fit") == (10, 118, 30)
    assert truncation_lengths(10, 200, 30, None, None) == (10, 200, 30)


# -- POET on ids == poet_mask on the untruncated batch ------------------------------------

@pytest.mark.parametrize("rule,ratio", [("min", 1.0), ("min", 0.5), ("own", 0.75)])
def test_poet_on_ids_equals_poet_mask(rule, ratio):
    exs = _random_examples(16, seed=2)
    exs[3] = exs[3].replace(rejected_ids=exs[3].chosen_ids[::-1].copy())  # an equal-length pair
    full = make_batch(exs, range(16), None, 0)
    cut = make_batch([poet_truncate_example(e, rule, ratio) for e in exs], range(16), None, 0)
    b = 16
    mc, mr = poet_mask(full.response_mask[:b], full.response_mask[b:], rule=rule, ratio=ratio)
    kept_mask = np.concatenate([np.asarray(mc), np.asarray(mr)])
    assert kept_mask.sum() == cut.response_mask.sum() < full.response_mask.sum()
    for row in range(2 * b):
        np.testing.assert_array_equal(full.input_ids[row][kept_mask[row] == 1], cut.input_ids[row][cut.response_mask[row] == 1])
        n = cut.attention_mask[row].sum()  # the cut rows are prefixes of the full rows
        np.testing.assert_array_equal(cut.input_ids[row, :n], full.input_ids[row, :n])
    if rule == "min" and ratio == 1.0:
        for e, c in zip(exs, [poet_truncate_example(e) for e in exs]):
            k = min(len(e.chosen_ids), len(e.rejected_ids))
            assert len(c.chosen_ids) == len(c.rejected_ids) == k
        assert cut.input_ids.shape[1] <= full.input_ids.shape[1]


# -- batches ---------------------------------------------------------------------------------

def test_make_batch_contract():
    exs = [
        Example(np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([6, 7, 8, 9], np.int32)),
        Example(np.array([1], np.int32), np.array([10], np.int32), np.array([11, 12], np.int32)),
    ]
    b = make_batch(exs, [0, 1, -1], (4, 8, 16), pad_id=0)
    assert b.input_ids.shape == b.attention_mask.shape == b.response_mask.shape == (6, 8)
    assert all(a.dtype == np.int32 for a in b.as_dict().values())
    np.testing.assert_array_equal(b.pair_valid, [1, 1, 0])
    np.testing.assert_array_equal(b.input_ids[0], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(b.input_ids[3], [1, 2, 3, 6, 7, 8, 9, 0])  # rejected rows follow
    np.testing.assert_array_equal(b.input_ids[4], [1, 11, 12, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.response_mask[3], [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b.attention_mask[1], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.input_ids[2], b.input_ids[0])  # filler repeats the first pair
    st = b.stacked()
    assert st["input_ids"].shape == (2, 3, 8)
    np.testing.assert_array_equal(st["input_ids"][1, 0], b.input_ids[3])
    assert default_bucket_lengths(2048) == (64, 128, 256, 512, 1024, 2048)
    assert default_bucket_lengths(1000) == (64, 128, 256, 512, 1000)
    assert default_bucket_lengths(130, multiple=64) == (64, 128, 192)
    with pytest.raises(ValueError, match="longer than the largest bucket length 4"):
        make_batch(exs, [0], (4,), 0)


@pytest.fixture(scope="module")
def hh_data(smollm2_tokenizer, shared_data, tmp_path_factory):
    """The whole HH-RLHF file, tokenized once (cached) for every variant below."""
    cache = tmp_path_factory.mktemp("data_cache")
    cfg = DataConfig(path=str(shared_data / HH), on_bad_record="skip", max_length=512, max_prompt_length=384,
                     show_progress=False)
    return build_preference_data(cfg, smollm2_tokenizer, cache_dir=cache), cache


@pytest.mark.parametrize("use_poet,group", [(False, False), (True, True)])
def test_buckets_bound_the_number_of_shapes_over_a_real_epoch(hh_data, smollm2_tokenizer, shared_data, use_poet, group):
    base, cache = hh_data
    cfg = DataConfig(path=str(shared_data / HH), on_bad_record="skip", max_length=512, max_prompt_length=384,
                     use_poet=use_poet, group_by_length=group, show_progress=False)
    data = build_preference_data(cfg, smollm2_tokenizer, cache_dir=cache)
    assert data.report.from_cache and data.report.skipped == base.report.skipped
    assert data.bucket_lengths == (64, 128, 256, 512)
    sampler = data.train_sampler(16)
    shapes = set()
    for _ in range(sampler.steps_per_epoch):
        batch = sampler.next_batch(data.train_examples, data.pad_id)
        assert batch.input_ids.shape[0] == 32 and batch.pair_valid.all()
        shapes.add(batch.input_ids.shape)
    assert len(shapes) <= len(data.bucket_lengths)
    if group:  # length-grouped batches use the smaller buckets too
        assert len(shapes) >= 3
    if use_poet:
        assert data.report.poet_tokens_removed > 0
        for e in data.train_examples:
            assert len(e.chosen_ids) == len(e.rejected_ids)


# -- sampler ------------------------------------------------------------------------------------

def _plans(sampler, n):
    return [next(sampler) for _ in range(n)]


@pytest.mark.parametrize("group,drop_last", [(False, True), (True, False)])
def test_two_processes_see_exactly_what_one_process_sees(group, drop_last):
    exs = _random_examples(75, seed=3)
    lengths = row_lengths(exs)
    kw = dict(bucket_lengths=(16, 32, 64, 128), seed=7, group_by_length=group, drop_last=drop_last, megabatch_size=2)
    one = BatchSampler(lengths, 8, **kw)
    procs = [BatchSampler(lengths, 8, process_index=i, process_count=2, **kw) for i in range(2)]
    steps = 2 * one.steps_per_epoch + 1
    seen = []
    for s0, s1, s in zip(*(_plans(p, steps) for p in (*procs, one))):
        np.testing.assert_array_equal(np.concatenate([s0.indices, s1.indices]), s.indices)
        np.testing.assert_array_equal(np.concatenate([s0.valid, s1.valid]), s.valid)
        assert s0.length == s1.length == s.length and (s0.epoch, s0.step) == (s.epoch, s.step)
        # the process batches stacked along the pair axis give the single-process batch
        b0, b1, b = (batch_from_plan(exs, p, 0) for p in (s0, s1, s))
        for k in ("input_ids", "response_mask"):
            np.testing.assert_array_equal(np.concatenate([b0.stacked()[k], b1.stacked()[k]], axis=1), b.stacked()[k])
        if s.epoch == 0:
            seen.extend(s.indices[s.valid == 1].tolist())
    # epoch 0: no duplicates, and no gaps beyond the dropped remainder
    assert len(seen) == len(set(seen)) == (72 if drop_last else 75)


def test_sampler_resume_continues_identically():
    lengths = row_lengths(_random_examples(50, seed=4))
    ref = BatchSampler(lengths, 8, seed=1, bucket_lengths=(32, 64, 128), group_by_length=True)
    expected = _plans(ref, 20)  # crosses two epoch boundaries (6 steps per epoch)
    run = BatchSampler(lengths, 8, seed=1, bucket_lengths=(32, 64, 128), group_by_length=True)
    _plans(run, 9)
    state = json.loads(json.dumps(run.state_dict()))  # goes through a checkpoint as plain ints
    assert state == {"epoch": 1, "step": 3, "seed": 1, "num_pairs": 50, "global_batch_size": 8}
    resumed = BatchSampler(lengths, 8, seed=999, bucket_lengths=(32, 64, 128), group_by_length=True)
    resumed.load_state_dict(state)
    for a, b in zip(_plans(resumed, 11), expected[9:]):
        np.testing.assert_array_equal(a.indices, b.indices)
        assert (a.length, a.epoch, a.step) == (b.length, b.epoch, b.step)
    # epochs differ in order; the same (seed, epoch) always gives the same order
    assert not np.array_equal(ref.epoch_batches(0), ref.epoch_batches(1))
    with pytest.raises(ValueError, match="global_batch_size=8 but this run has 4"):
        BatchSampler(lengths, 4).load_state_dict(state)


def test_group_by_length_cuts_padding():
    exs = _random_examples(256, seed=5, max_len=200)
    lengths = row_lengths(exs)

    def padding(group):
        s = BatchSampler(lengths, 16, seed=0, group_by_length=group)
        pads = [p.length * 16 - lengths[p.indices].sum() for p in _plans(s, s.steps_per_epoch)]
        return sum(pads)

    assert padding(True) < 0.5 * padding(False)


def test_eval_plans_cover_every_pair_once_across_processes():
    exs = _random_examples(36, seed=6)
    lengths = row_lengths(exs)
    seen = []
    for pi in range(2):
        plans = eval_plans(lengths, 8, bucket_lengths=(16, 32, 64, 128), process_index=pi, process_count=2)
        assert len(plans) == 5
        for p in plans:
            seen.extend(p.indices[p.valid == 1].tolist())
            assert len(p.indices) == 4 and p.length >= lengths[p.indices].max()
    assert sorted(seen) == list(range(36))
    last = eval_plans(lengths, 8, process_index=1, process_count=2)[-1]
    assert last.valid.sum() == 0  # 36 = 4*8 + 4: process 1's half of the last batch is filler
    batch = batch_from_plan(exs, last, 0)
    assert batch.pair_valid.sum() == 0 and batch.response_mask.sum(axis=1).min() > 0
