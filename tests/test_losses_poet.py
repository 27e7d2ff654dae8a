"""POET masks, keep-length rules, prefix margins, degenerate inputs, and mask == physical truncation."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poet_jax import losses as L

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


# ---------------------------------------------------------------- keep lengths
def _ref_keep(nc, nr, rule, ratio):
    def fc(n):
        return 0 if n == 0 else max(1, math.ceil(Fraction(ratio).limit_denominator(1000) * n))

    if rule == "min":
        return fc(min(nc, nr)), fc(min(nc, nr))
    if rule == "own":
        return fc(nc), fc(nr)
    return nc, nr


_keep_jit = jax.jit(L.poet_keep_lengths, static_argnums=(2, 3))


@SETTINGS
@given(nc=st.lists(st.integers(0, 3000), min_size=6, max_size=6), data=st.data(),
       rule=st.sampled_from(["min", "own"]), ratio=st.sampled_from([1.0, 0.75, 0.5, 0.25, 0.7, 0.1, 1 / 3, 0.001]))
def test_keep_lengths_numpy_jax_python_agree(nc, data, rule, ratio):
    nr = data.draw(st.lists(st.integers(0, 3000), min_size=len(nc), max_size=len(nc)))
    want = np.array([_ref_keep(a, b, rule, ratio) for a, b in zip(nc, nr)])
    got_np = np.stack(L.poet_keep_lengths(np.array(nc), np.array(nr), rule, ratio), axis=1)
    got_jx = np.stack([np.asarray(x) for x in L.poet_keep_lengths(jnp.array(nc), jnp.array(nr), rule, ratio)], axis=1)
    got_jit = np.stack([np.asarray(x) for x in _keep_jit(jnp.array(nc), jnp.array(nr), rule, ratio)], axis=1)
    got_py = np.array([L.poet_keep_lengths(a, b, rule, ratio) for a, b in zip(nc, nr)])
    for got in (got_np, got_jx, got_jit, got_py):
        np.testing.assert_array_equal(got, want)
    assert np.all(want[:, 0] <= np.array(nc)) and np.all(want[:, 1] <= np.array(nr))


def test_keep_lengths_documented_examples():
    assert L.poet_keep_lengths(10, 7) == (7, 7)
    assert L.poet_keep_lengths(7, 7) == (7, 7)
    assert L.poet_keep_lengths(10, 7, "min", 0.5) == (4, 4)  # ceil(3.5)
    assert L.poet_keep_lengths(10, 7, "own", 0.5) == (5, 4)
    assert L.poet_keep_lengths(10, 7, "own", 0.7) == (7, 5)  # exact ceil: 0.7*10 is 7, not 8
    assert L.poet_keep_lengths(10, 1, "min", 0.25) == (1, 1)  # at least one token
    assert L.poet_keep_lengths(10, 0) == (0, 0)
    assert L.poet_keep_lengths(10, 3, "none") == (10, 3)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            L.poet_keep_lengths(3, 4, "min", bad)
    with pytest.raises(ValueError, match="valid rules: min, own, none"):
        L.poet_keep_lengths(3, 4, "max")
    with pytest.raises(ValueError, match="denominator"):
        L.poet_keep_lengths(3, 4, "min", 0.123456789)


# ---------------------------------------------------------------- masks
def _layout(lengths_prompt, lengths_resp, t, side):
    """Response masks for rows with given prompt/response lengths, left or right padded."""
    m = np.zeros((len(lengths_resp), t), np.int32)
    for i, (p, n) in enumerate(zip(lengths_prompt, lengths_resp)):
        start = p if side == "right" else t - n
        m[i, start:start + n] = 1
    return m


@SETTINGS
@given(seed=st.integers(0, 10**6), side_c=st.sampled_from(["left", "right"]),
       side_r=st.sampled_from(["left", "right"]))
def test_poet_mask_keeps_first_k_of_each_response(seed, side_c, side_r):
    rng = np.random.default_rng(seed)
    b, t = 5, 16
    pc, pr = rng.integers(0, 5, b), rng.integers(0, 5, b)  # unequal prompt lengths
    nc, nr = rng.integers(1, 12, b), rng.integers(1, 12, b)
    nr[0] = nc[0]  # one equal-length pair
    mc, mr = _layout(pc, nc, t, side_c), _layout(pr, nr, t, side_r)
    kc, kr = L.poet_mask(mc, mr)
    kcj, krj = L.poet_mask(jnp.asarray(mc), jnp.asarray(mr))
    np.testing.assert_array_equal(kc, np.asarray(kcj))
    np.testing.assert_array_equal(kr, np.asarray(krj))
    assert kc.dtype == mc.dtype and kc.shape == mc.shape
    k = np.minimum(nc, nr)
    for i in range(b):
        for m, km, ki in ((mc, kc, k[i]), (mr, kr, k[i])):
            pos = np.nonzero(m[i])[0]
            np.testing.assert_array_equal(np.nonzero(km[i])[0], pos[:ki])  # first k of its own response
        if nc[i] == nr[i]:
            np.testing.assert_array_equal(kc[i], mc[i])
            np.testing.assert_array_equal(kr[i], mr[i])
        shorter, kept = (mc, kc) if nc[i] <= nr[i] else (mr, kr)
        # the shorter response is unchanged, so it keeps its last (EOS) token
        np.testing.assert_array_equal(kept[i], shorter[i])
        assert kept[i][np.nonzero(shorter[i])[0][-1]] == 1


def test_poet_mask_ablation_rules_and_metrics():
    mc = _layout([2], [10], 16, "right")
    mr = _layout([3], [7], 16, "left")
    kc, kr = L.poet_mask(mc, mr, rule="min", ratio=0.5)
    assert (kc.sum(), kr.sum()) == (4, 4)
    kc, kr = L.poet_mask(mc, mr, rule="own", ratio=0.5)
    assert (kc.sum(), kr.sum()) == (5, 4)
    assert np.nonzero(kr[0])[0].tolist() == [9, 10, 11, 12]  # from the rejected response's own start
    kc, kr = L.poet_mask(mc.astype(bool), mr.astype(bool))
    assert kc.dtype == bool
    met = L.poet_metrics(mc, mr, kc, kr)
    assert float(met["poet/k"][0]) == 7.0
    np.testing.assert_allclose(met["poet/kept_fraction"], [14 / 17])
    assert float(met["poet/response_tokens"][0]) == 17 and float(met["poet/kept_tokens"][0]) == 14
    with pytest.raises(ValueError, match="same B"):
        L.poet_mask(mc, np.concatenate([mr, mr]))


def test_check_masks():
    mc = _layout([2, 2], [3, 0], 8, "right")
    mr = _layout([2, 2], [4, 2], 8, "right")
    with pytest.raises(ValueError, match=r"empty chosen response .* pair\(s\) \[1\]"):
        L.check_masks(mc, mr)
    L.check_masks(mc, mr, pair_valid=np.array([1, 0]))  # filler pair may be empty
    with pytest.raises(ValueError, match=r"empty rejected response .* \[0\]"):
        L.check_masks(mr, np.zeros_like(mr), pair_valid=np.array([1, 0]))


def test_degenerate_rows_never_nan_under_jit():
    """All-masked / empty responses: every loss gives finite values and gradients under jit."""
    t = 6
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, t, 9))
    targets = jax.random.randint(jax.random.PRNGKey(1), (4, t), 0, 9)
    mc = jnp.asarray(np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))
    mr = jnp.asarray(np.array([[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]))

    def f(lg):
        lp = L.token_logps(lg, targets)
        kc, kr = L.poet_mask(mc, mr)
        pc, pr = L.sequence_logps(lp[:2], kc), L.sequence_logps(lp[2:], kr)
        out = []
        for name in sorted(L.LOSSES):
            loss, _ = L.compute_preference_loss(
                name, pc, pr, ref_chosen_logps=pc * 0.9, ref_rejected_logps=pr * 1.1,
                chosen_lengths=L.response_lengths(kc), rejected_lengths=L.response_lengths(kr),
                chosen_nll=-L.sequence_logps(lp[:2], kc, average=True),
                **({"label_smoothing": 1e-3} if name == "exo_pair" else {}))
            out.append(jnp.sum(loss))
        return jnp.stack(out)

    vals, grad = jax.jit(lambda lg: (f(lg), jax.grad(lambda x: jnp.sum(f(x)))(lg)))(logits)
    bad = [n for n, v in zip(sorted(L.LOSSES), np.asarray(vals)) if not np.isfinite(v)]
    assert not bad, f"non-finite loss for {bad}"
    assert np.all(np.isfinite(np.asarray(grad)))  # a NaN/inf in any loss's gradient would show here
    # the empty row averages to 0, not NaN
    lp = L.token_logps(logits, targets)
    assert float(L.sequence_logps(lp[:2], mc, average=True)[1]) == 0.0


# ---------------------------------------------------------------- toy causal model: mask == truncation
V, D = 11, 6


def _init(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"E": jax.random.normal(k[0], (V, D)), "W": jax.random.normal(k[1], (D, D)) * 0.5,
            "U": jax.random.normal(k[2], (D, V))}


def _toy_from_emb(params, emb, attn):
    """Causal: position t sees the attention-weighted mean of embeddings <= t (no positions)."""
    a = attn.astype(emb.dtype)[..., None]
    csum = jnp.cumsum(emb * a, axis=1)
    cnt = jnp.maximum(jnp.cumsum(a, axis=1), 1.0)
    h = jnp.tanh((csum / cnt) @ params["W"] + emb)
    return h @ params["U"]


def _toy(params, ids, attn):
    return _toy_from_emb(params, params["E"][ids], attn)


def _build(prompts, responses, side, pad_id=0, t=16):
    """Rows of prompt+response, padded to ``t``; returns ids, attention mask, response mask."""
    ids = np.full((len(prompts), t), pad_id, np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        s = 0 if side == "right" else t - len(seq)
        ids[i, s:s + len(seq)] = seq
        attn[i, s:s + len(seq)] = 1
        resp[i, s + len(p):s + len(seq)] = 1
    return ids, attn, resp


_NAMES = sorted(L.LOSSES)


def _all_losses_from_batch(params, ref_params, ids, attn, resp, b, poet):
    """Mean loss of every registered loss on one batch: ``[len(LOSSES)]``."""
    lp = L.token_logps(_toy(params, ids, attn)[:, :-1], ids[:, 1:])
    rlp = jax.lax.stop_gradient(L.token_logps(_toy(ref_params, ids, attn)[:, :-1], ids[:, 1:]))
    m = resp[:, 1:]
    mc, mr = m[:b], m[b:]
    if poet:
        mc, mr = L.poet_mask(mc, mr)
    out = []
    for name in _NAMES:
        loss, _ = L.compute_preference_loss(
            name, L.sequence_logps(lp[:b], mc), L.sequence_logps(lp[b:], mr),
            ref_chosen_logps=L.sequence_logps(rlp[:b], mc), ref_rejected_logps=L.sequence_logps(rlp[b:], mr),
            chosen_lengths=L.response_lengths(mc), rejected_lengths=L.response_lengths(mr),
            chosen_nll=-L.sequence_logps(lp[:b], mc, average=True),
            **({"label_smoothing": 1e-3} if name == "exo_pair" else {}))
        out.append(jnp.mean(loss))
    return jnp.stack(out)


_losses_and_jac = jax.jit(
    lambda *a: (_all_losses_from_batch(*a), jax.jacrev(_all_losses_from_batch)(*a)), static_argnums=(5, 6))


@functools.partial(jax.jit, static_argnums=5)
def _emb_logit_grads(params, ref_params, ids, attn, resp, b):
    def loss_from_emb_logits(emb, extra_logits):
        logits = _toy_from_emb(params, emb, attn) + extra_logits
        lp = L.token_logps(logits[:, :-1], ids[:, 1:])
        rlp = jax.lax.stop_gradient(L.token_logps(_toy(ref_params, ids, attn)[:, :-1], ids[:, 1:]))
        mc, mr = L.poet_mask(resp[:b, 1:], resp[b:, 1:])
        loss, _ = L.dpo_loss(L.sequence_logps(lp[:b], mc), L.sequence_logps(lp[b:], mr),
                             L.sequence_logps(rlp[:b], mc), L.sequence_logps(rlp[b:], mr), beta=0.5)
        return jnp.sum(loss)

    emb = params["E"][ids]
    return jax.grad(loss_from_emb_logits, argnums=(0, 1))(emb, jnp.zeros(ids.shape + (V,)))


def _random_pairs(rng, b):
    prompts_c, prompts_r, resp_c, resp_r = [], [], [], []
    for _ in range(b):
        p = rng.integers(1, V, rng.integers(1, 5)).tolist()
        q = p + rng.integers(1, V, rng.integers(0, 2)).tolist()  # chosen/rejected prompts may differ
        prompts_c.append(p)
        prompts_r.append(q)
        resp_c.append(rng.integers(1, V, rng.integers(1, 9)).tolist())
        resp_r.append(rng.integers(1, V, rng.integers(1, 9)).tolist())
    return prompts_c, prompts_r, resp_c, resp_r


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), side=st.sampled_from(["left", "right"]))
def test_poet_mask_equals_physical_truncation_on_toy_model(seed, side):
    rng = np.random.default_rng(seed)
    b = 3
    pc, pr, rc, rr = _random_pairs(rng, b)
    params, ref_params = _init(seed % 97), _init(seed % 97 + 1)
    ids, attn, resp = (jnp.asarray(x) for x in _build(pc + pr, rc + rr, side))
    k = [min(len(x), len(y)) for x, y in zip(rc, rr)]
    tids, tattn, tresp = (jnp.asarray(x) for x in _build(pc + pr, [x[:kk] for x, kk in zip(rc, k)]
                                                           + [y[:kk] for y, kk in zip(rr, k)], side))
    # every loss: values and parameter gradients agree. Run in float64 so that the only
    # possible difference is a real one (fp32 summation order differs between layouts).
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, ref_params))
        v1, g1 = _losses_and_jac(*p64, ids, attn, resp, b, True)
        # the truncated batch already has equal-length responses, so POET leaves it as is
        # (checked below) and the same compiled function serves both batches
        v2, g2 = _losses_and_jac(*p64, tids, tattn, tresp, b, True)
        assert v1.dtype == jnp.float64
    for got, want in zip(L.poet_mask(np.asarray(tresp[:b]), np.asarray(tresp[b:])), (tresp[:b], tresp[b:])):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(v1, v2, rtol=1e-10, atol=1e-12)
    for key in g1:
        np.testing.assert_allclose(g1[key], g2[key], rtol=1e-9, atol=1e-11, err_msg=key)
    assert np.all(np.abs(np.asarray(g1["U"])).sum(axis=(1, 2)) > 0)  # every loss has a nonzero gradient

    # tokens past k: exactly zero gradient w.r.t. their input embeddings and the logits there
    g_emb, g_logits = _emb_logit_grads(params, ref_params, ids, attn, resp, b)
    g_emb, g_logits = np.asarray(g_emb), np.asarray(g_logits)
    resp_np = np.asarray(resp)
    kept = np.asarray(jnp.concatenate(L.poet_mask(resp[:b, 1:], resp[b:, 1:]), axis=0))
    for row in range(2 * b):
        pos = np.nonzero(resp_np[row])[0]
        kk = k[row % b]
        past = pos[kk:]
        assert np.all(g_emb[row, past] == 0.0)
        assert np.all(g_emb[row, pos[-1] + 1:] == 0.0)
        # logits at position t score token t+1: only kept tokens' predecessors get gradient
        scored = np.zeros(ids.shape[1], bool)
        scored[:-1] = kept[row].astype(bool)
        assert np.all(g_logits[row, ~scored] == 0.0)
        assert np.any(g_emb[row, : pos[0] + 1] != 0.0)  # and the prompt/early tokens do get gradient


# ---------------------------------------------------------------- prefix margins
def _ref_prefix(pc, pr, rc, rr, mc, mr, beta):
    b = pc.shape[0]
    width = max(pc.shape[1], pr.shape[1])
    out = np.zeros((b, width))
    for i in range(b):
        dc = (pc[i] - rc[i])[mc[i].astype(bool)]
        dr = (pr[i] - rr[i])[mr[i].astype(bool)]
        a = np.zeros(width)
        a[:len(dc)] += dc
        a[:len(dr)] -= dr
        out[i] = beta * np.cumsum(a)
    return out


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), side=st.sampled_from(["left", "right"]))
def test_prefix_margins(seed, side):
    rng = np.random.default_rng(seed)
    b, tc, tr = 4, 9, 12
    nc, nr = rng.integers(1, tc - 2, b), rng.integers(1, tr - 3, b)
    mc = _layout(rng.integers(0, 2, b), nc, tc, side)
    mr = _layout(rng.integers(0, 3, b), nr, tr, side)
    pc, rc = -rng.uniform(0, 3, (b, tc)), -rng.uniform(0, 3, (b, tc))
    pr, rr = -rng.uniform(0, 3, (b, tr)), -rng.uniform(0, 3, (b, tr))
    pc[mc == 0] = -np.inf  # garbage off the mask must not leak
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    m = L.prefix_margins(f32(pc), f32(pr), f32(rc), f32(rr), jnp.asarray(mc), jnp.asarray(mr), 0.3)
    pc[mc == 0] = 0.0
    want = _ref_prefix(*(np.float32(x).astype(np.float64) for x in (pc, pr, rc, rr)), mc, mr, 0.3)
    assert m.shape == (b, tr)
    np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-5)
    # at the full length it is the DPO margin
    _, met = L.dpo_loss(*(L.sequence_logps(f32(x), jnp.asarray(y)) for x, y in
                          ((pc, mc), (pr, mr), (rc, mc), (rr, mr))), beta=0.3)
    full = L.prefix_margins_at(m, jnp.maximum(jnp.asarray(nc), jnp.asarray(nr)))
    np.testing.assert_allclose(full, met["rewards/margins"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[:, -1], met["rewards/margins"], rtol=1e-5, atol=1e-5)
    # at per-pair k and at fractions of min length
    k = np.minimum(nc, nr)
    np.testing.assert_allclose(L.prefix_margins_at(m, jnp.asarray(k)), want[np.arange(b), k - 1], rtol=1e-5, atol=1e-5)
    assert float(L.prefix_margins_at(m, jnp.zeros(b, jnp.int32))[0]) == 0.0
    fr = L.prefix_margins_at_fractions(m, nc, nr, [0.25, 0.5, 1.0])
    for j, f in enumerate([0.25, 0.5, 1.0]):
        kf = np.maximum(1, np.ceil(f * k - 1e-9)).astype(int)
        np.testing.assert_allclose(fr[:, j], want[np.arange(b), kf - 1], rtol=1e-5, atol=1e-5)
    # POET-masked margins: M at k equals the margin of the POET-cut DPO
    kc, kr = L.poet_mask(mc, mr)
    _, met_poet = L.dpo_loss(*(L.sequence_logps(f32(x), jnp.asarray(y)) for x, y in
                               ((pc, kc), (pr, kr), (rc, kc), (rr, kr))), beta=0.3)
    np.testing.assert_allclose(L.prefix_margins_at(m, jnp.asarray(k)), met_poet["rewards/margins"],
                               rtol=1e-5, atol=1e-5)
    jm = jax.jit(L.prefix_margins, static_argnums=6)(f32(pc), f32(pr), f32(rc), f32(rr), jnp.asarray(mc),
                                                     jnp.asarray(mr), 0.3)
    np.testing.assert_allclose(jm, m, rtol=1e-6, atol=1e-6)
