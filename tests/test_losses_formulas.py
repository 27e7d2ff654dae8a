"""Every preference loss against an independent numpy (float64) reference of TRL's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poet_jax import losses as L

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


# ---------------------------------------------------------------- numpy reference (TRL formulas)
def logsig(z):
    return -np.logaddexp(0.0, -z)


def sig(z):
    return np.exp(logsig(z))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, ls=0.0, nc=None, nr=None, delta=0.0, tau=0.05):
    hw, hl = pc - rc, pr - rr
    d = hw - hl
    if loss_type == "sigmoid":
        return -logsig(beta * d) * (1 - ls) - logsig(-beta * d) * ls
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if loss_type == "ipo":
        x = hw / np.maximum(nc, 1) - hl / np.maximum(nr, 1)
        return (x - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        z = beta * d
        return sig(z) * (logsig(z) - np.log1p(-ls)) + sig(-z) * (logsig(-z) - np.log(ls))
    if loss_type == "nca_pair":
        return -logsig(beta * hw) - 0.5 * logsig(-beta * hw) - 0.5 * logsig(-beta * hl)
    if loss_type == "robust":
        return (-(1 - ls) * logsig(beta * d) + ls * logsig(-beta * d)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -logsig(beta * hw - delta) - logsig(-(beta * hl - delta))
    if loss_type == "sppo_hard":
        return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a, b = np.sort(pc - pr), np.sort(rc - rr)
        else:
            a, b = np.sort(hw), np.sort(hl)
        return -logsig(beta * (a - b)) * (1 - ls) - logsig(-beta * (a - b)) * ls  # in sorted order
    if loss_type == "apo_zero":
        return 1 - sig(beta * hw) + sig(beta * hl)
    if loss_type == "apo_down":
        return sig(beta * hw) + 1 - sig(beta * d)
    if loss_type == "discopop":
        z = beta * d
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + np.exp(-z) * m
    if loss_type == "sigmoid_norm":
        x = hw / np.maximum(nc, 1) - hl / np.maximum(nr, 1)
        return -logsig(beta * x)
    raise AssertionError(loss_type)


def ref_simpo(pc, pr, nc, nr, beta, gbr, loss_type, ls=0.0):
    z = beta * (pc / np.maximum(nc, 1) - pr / np.maximum(nr, 1) - gbr)
    if loss_type == "sigmoid":
        return -logsig(z) * (1 - ls) - logsig(-z) * ls
    return np.maximum(0.0, 1 - z)


def ref_cpo(pc, pr, nll, beta, loss_type, ls, cpo_alpha, gamma, alpha, nc, nr):
    if loss_type in ("ipo", "simpo"):
        pc, pr = pc / np.maximum(nc, 1), pr / np.maximum(nr, 1)
    if alpha:
        pc, pr = (1 - np.exp(pc) ** (-alpha)) / alpha, (1 - np.exp(pr) ** (-alpha)) / alpha
    x = pc - pr
    if loss_type == "simpo":
        x = x - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        out = -logsig(beta * x) * (1 - ls) - logsig(-beta * x) * ls
    elif loss_type == "hinge":
        out = np.maximum(0.0, 1 - beta * x)
    else:
        out = (x - 1 / (2 * beta)) ** 2
    return out + cpo_alpha * nll


def ref_orpo(pc, pr, nll, nc, nr, beta):
    ac, ar = pc / np.maximum(nc, 1), pr / np.maximum(nr, 1)
    log_odds = (ac - ar) - (np.log(-np.expm1(ac)) - np.log(-np.expm1(ar)))
    return nll - beta * logsig(log_odds)


# ---------------------------------------------------------------- random inputs
@st.composite
def pair_inputs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    b = draw(st.sampled_from([3, 6]))
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 40, b)
    nr = rng.integers(1, 40, b)
    pc = -rng.uniform(0.2, 2.5, b) * nc
    pr = -rng.uniform(0.2, 2.5, b) * nr
    rc = pc + rng.normal(0, 2.0, b)
    rr = pr + rng.normal(0, 2.0, b)
    nll = rng.uniform(0.1, 3.0, b)
    beta = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    ls = draw(st.sampled_from([0.0, 0.1, 0.3]))
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, nll=nll, beta=beta, ls=ls)


def _j(x, dtype):
    return jnp.asarray(np.asarray(x, dtype))


def _dpo_kwargs(t, ls):
    if t == "exo_pair":
        return {"label_smoothing": max(ls, 1e-3)}
    if t in ("sigmoid", "robust", "aot", "aot_unpaired"):
        return {"label_smoothing": ls}
    return {}


def _check_dpo(inp, t, dtype, rtol, atol):
    kw = _dpo_kwargs(t, inp["ls"])
    extra = {"bco_reward_mean": 0.37} if t == "bco_pair" else {}
    cast = {k: np.asarray(inp[k], dtype) for k in ("pc", "pr", "rc", "rr")}
    loss, metrics = L.dpo_loss(
        *(_j(cast[k], dtype) for k in ("pc", "pr", "rc", "rr")),
        beta=inp["beta"], loss_type=t, chosen_lengths=jnp.asarray(inp["nc"]),
        rejected_lengths=jnp.asarray(inp["nr"]), **kw, **extra,
    )
    args = {k: cast[k].astype(np.float64) for k in cast}
    want = ref_dpo(args["pc"], args["pr"], args["rc"], args["rr"], inp["beta"], t, kw.get("label_smoothing", 0.0),
                   inp["nc"], inp["nr"], delta=extra.get("bco_reward_mean", 0.0))
    got = np.asarray(loss, np.float64)
    if t in ("aot", "aot_unpaired"):  # per-pair placement is a permutation: compare the multiset
        got, want = np.sort(got), np.sort(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=t)
    cr = inp["beta"] * (args["pc"] - args["rc"])
    rj = inp["beta"] * (args["pr"] - args["rr"])
    np.testing.assert_allclose(metrics["rewards/chosen"], cr, rtol=rtol, atol=atol)
    np.testing.assert_allclose(metrics["rewards/rejected"], rj, rtol=rtol, atol=atol)
    np.testing.assert_allclose(metrics["rewards/margins"], cr - rj, rtol=rtol, atol=atol * 10)
    np.testing.assert_array_equal(np.asarray(metrics["rewards/accuracies"]),
                                  np.asarray(metrics["rewards/chosen"]) > np.asarray(metrics["rewards/rejected"]))
    np.testing.assert_allclose(metrics["logps/chosen"], args["pc"], rtol=rtol)
    np.testing.assert_allclose(metrics["logps/rejected"], args["pr"], rtol=rtol)


@pytest.mark.parametrize("t", L.DPO_LOSS_TYPES)
@SETTINGS
@given(inp=pair_inputs())
def test_dpo_losses_float64_exact(t, inp):
    with jax.enable_x64(True):
        _check_dpo(inp, t, np.float64, rtol=1e-10, atol=1e-12)


@given(inp=pair_inputs())
@SETTINGS
def test_dpo_losses_float32_rel_1e6(inp):
    for t in L.DPO_LOSS_TYPES:
        # fp32 inputs, float64 reference on the same fp32 numbers; atol covers values near 0
        _check_dpo(inp, t, np.float32, rtol=1e-6, atol=2e-6)


@SETTINGS
@given(inp=pair_inputs(), t=st.sampled_from(["sigmoid", "hinge"]), gbr=st.sampled_from([0.0, 0.3, 0.8]))
def test_simpo(inp, t, gbr):
    ls = inp["ls"] if t == "sigmoid" else 0.0
    with jax.enable_x64(True):
        loss, m = L.simpo_loss(_j(inp["pc"], np.float64), _j(inp["pr"], np.float64), inp["nc"], inp["nr"],
                               beta=inp["beta"] * 10, gamma_beta_ratio=gbr, loss_type=t, label_smoothing=ls)
    want = ref_simpo(inp["pc"], inp["pr"], inp["nc"], inp["nr"], inp["beta"] * 10, gbr, t, ls)
    np.testing.assert_allclose(loss, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["logps/chosen"], inp["pc"] / inp["nc"], rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected"], inp["beta"] * 10 * inp["pr"] / inp["nr"], rtol=1e-12)
    # fp32 path
    loss32, _ = L.simpo_loss(_j(inp["pc"], np.float32), _j(inp["pr"], np.float32), inp["nc"], inp["nr"],
                             beta=inp["beta"] * 10, gamma_beta_ratio=gbr, loss_type=t, label_smoothing=ls)
    want32 = ref_simpo(np.float32(inp["pc"]).astype(np.float64), np.float32(inp["pr"]).astype(np.float64),
                       inp["nc"], inp["nr"], inp["beta"] * 10, gbr, t, ls)
    np.testing.assert_allclose(loss32, want32, rtol=1e-6, atol=2e-6)


@SETTINGS
@given(inp=pair_inputs(), t=st.sampled_from(L.CPO_LOSS_TYPES), cpo_alpha=st.sampled_from([0.0, 1.0]),
       alpha=st.sampled_from([0.0, 0.25]))
def test_cpo(inp, t, cpo_alpha, alpha):
    ls = inp["ls"] if t in ("sigmoid", "simpo") else 0.0
    with jax.enable_x64(True):
        loss, m = L.cpo_loss(_j(inp["pc"] / 20, np.float64), _j(inp["pr"] / 20, np.float64),
                             _j(inp["nll"], np.float64), beta=inp["beta"], loss_type=t, label_smoothing=ls,
                             cpo_alpha=cpo_alpha, simpo_gamma=0.5, alpha=alpha,
                             chosen_lengths=inp["nc"], rejected_lengths=inp["nr"])
    want = ref_cpo(inp["pc"] / 20, inp["pr"] / 20, inp["nll"], inp["beta"], t, ls, cpo_alpha, 0.5, alpha,
                   inp["nc"], inp["nr"])
    np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m["nll_loss"], inp["nll"], rtol=1e-12)


@SETTINGS
@given(inp=pair_inputs())
def test_orpo(inp):
    with jax.enable_x64(True):
        loss, m = L.orpo_loss(_j(inp["pc"], np.float64), _j(inp["pr"], np.float64), _j(inp["nll"], np.float64),
                              inp["nc"], inp["nr"], beta=inp["beta"])
    want = ref_orpo(inp["pc"], inp["pr"], inp["nll"], inp["nc"], inp["nr"], inp["beta"])
    np.testing.assert_allclose(loss, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["logps/chosen"], inp["pc"] / inp["nc"], rtol=1e-12)
    loss32, _ = L.orpo_loss(_j(inp["pc"], np.float32), _j(inp["pr"], np.float32), _j(inp["nll"], np.float32),
                            inp["nc"], inp["nr"], beta=inp["beta"])
    want32 = ref_orpo(*(np.float32(inp[k]).astype(np.float64) for k in ("pc", "pr", "nll")),
                      inp["nc"], inp["nr"], inp["beta"])
    np.testing.assert_allclose(loss32, want32, rtol=1e-6, atol=2e-6)


def test_dpo_zero_margin_is_ln2():
    z = jnp.zeros(5, jnp.float32) - 7.0
    loss, m = L.dpo_loss(z, z - 3.0, z, z - 3.0, beta=0.1)
    assert np.all(np.asarray(loss) == np.float32(math.log(2.0)))
    assert np.all(np.asarray(m["rewards/accuracies"]) == 0.0)
    with jax.enable_x64(True):
        z = jnp.zeros(3, jnp.float64)
        assert np.all(np.asarray(L.dpo_loss(z, z, z, z)[0]) == math.log(2.0))


def test_aot_pair_mask_ignores_padding_pairs():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(size=6) * 3, jnp.float32) for _ in range(4))
    valid = np.array([1, 0, 1, 1, 0, 1], bool)
    for t in ("aot", "aot_unpaired"):
        full, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=t, pair_mask=jnp.asarray(valid))
        sub, _ = L.dpo_loss(pc[valid], pr[valid], rc[valid], rr[valid], beta=0.5, loss_type=t)
        # valid slots carry exactly the losses of the batch without padding pairs
        np.testing.assert_allclose(np.sort(np.asarray(full)[valid]), np.sort(np.asarray(sub)), rtol=1e-6)
        s, c = L.reduce_pairs(full, jnp.asarray(valid, jnp.float32))
        np.testing.assert_allclose(s / c, np.mean(np.asarray(sub)), rtol=1e-6)


# ---------------------------------------------------------------- registry, jit / grad / vmap
def _all_inputs(b=4, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n = jnp.asarray(rng.integers(1, 20, b))
    m = jnp.asarray(rng.integers(1, 20, b))
    pc = jnp.asarray(-rng.uniform(0.5, 2, b), dtype) * n
    pr = jnp.asarray(-rng.uniform(0.5, 2, b), dtype) * m
    return dict(policy_chosen_logps=pc, policy_rejected_logps=pr,
                ref_chosen_logps=pc + 0.3, ref_rejected_logps=pr - 0.2,
                chosen_lengths=n, rejected_lengths=m, chosen_nll=-pc / n,
                pair_mask=jnp.ones(b, bool))


def _hp(name):
    return {"label_smoothing": 1e-3} if name == "exo_pair" else {}


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_registry_jit_grad_vmap(name):
    inp = _all_inputs()
    hp = _hp(name)

    def total(pc, pr):
        kw = dict(inp, policy_chosen_logps=pc, policy_rejected_logps=pr)
        loss, metrics = L.compute_preference_loss(name, **kw, **hp)
        return jnp.mean(loss), metrics

    eager, metrics = total(inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    jitted, _ = jax.jit(total)(inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert metrics[key].shape == (4,)
    g = jax.grad(lambda a, b: total(a, b)[0], argnums=(0, 1))(inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
    assert any(np.any(np.asarray(x) != 0) for x in g)
    # finite-difference check of the gradient on one coordinate (fp64)
    with jax.enable_x64(True):
        inp64 = {k: (v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in inp.items()}

        def f64(pc):
            kw = dict(inp64, policy_chosen_logps=pc)
            return jnp.mean(L.compute_preference_loss(name, **kw, **hp)[0])

        x = inp64["policy_chosen_logps"]
        gx = jax.grad(f64)(x)
        e = jnp.zeros_like(x).at[1].set(1e-6)
        fd = (f64(x + e) - f64(x - e)) / 2e-6
        np.testing.assert_allclose(gx[1], fd, rtol=1e-4, atol=1e-8)
    # vmap over an extra leading axis (e.g. several micro-batches at once)
    stacked = {k: jnp.stack([v, v]) for k, v in inp.items()}

    def per_mb(kw):
        return L.compute_preference_loss(name, **kw, **hp)[0]

    vm = jax.vmap(per_mb)(stacked)
    np.testing.assert_allclose(vm[0], per_mb(inp), rtol=1e-6)
    np.testing.assert_allclose(vm[1], per_mb(inp), rtol=1e-6)


def test_registry_metadata_and_errors():
    assert set(L.DPO_LOSS_TYPES) <= set(L.LOSSES)
    assert all(L.needs_reference(t) for t in L.DPO_LOSS_TYPES)
    assert not any(L.needs_reference(t) for t in ("simpo", "simpo_hinge", "cpo", "cpo_simpo", "orpo"))
    with pytest.raises(ValueError, match="valid losses: .*sigmoid"):
        L.needs_reference("dpoo")
    inp = _all_inputs()
    with pytest.raises(ValueError, match="unknown loss 'nope'; valid losses"):
        L.compute_preference_loss("nope", inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        L.compute_preference_loss("sigmoid", inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    with pytest.raises(ValueError, match="does not take"):
        L.compute_preference_loss("hinge", **inp, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_loss(*(inp[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                      "ref_chosen_logps", "ref_rejected_logps")), loss_type="ipo")
    with pytest.raises(ValueError, match="valid: sigmoid"):
        L.dpo_loss(*(inp[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                      "ref_chosen_logps", "ref_rejected_logps")), loss_type="sigmod")
    with pytest.raises(ValueError, match="exo_pair"):
        L.dpo_loss(*(inp[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                      "ref_chosen_logps", "ref_rejected_logps")), loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(*(inp[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                      "ref_chosen_logps", "ref_rejected_logps")), loss_type="hinge",
                   label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        L.cpo_loss(inp["policy_chosen_logps"], inp["policy_rejected_logps"])
    # cpo with cpo_alpha=0 needs no NLL
    loss, _ = L.compute_preference_loss("cpo", inp["policy_chosen_logps"], inp["policy_rejected_logps"], cpo_alpha=0.0)
    assert loss.shape == (4,)


def test_reduce_pairs_exact_accumulation():
    rng = np.random.default_rng(1)
    vals = rng.normal(size=12).astype(np.float32)
    w = np.array([1] * 9 + [0] * 3, np.float32)
    vals_nan = vals.copy()
    vals_nan[-1] = np.nan  # a padding pair with garbage contributes nothing
    total = [L.reduce_pairs(jnp.asarray(vals_nan[i:i + 4]), jnp.asarray(w[i:i + 4])) for i in (0, 4, 8)]
    s = sum(float(t[0]) for t in total)
    c = sum(float(t[1]) for t in total)
    np.testing.assert_allclose(s / c, vals[:9].mean(), rtol=1e-6)
    assert float(L.safe_mean(jnp.float32(0), jnp.float32(0))) == 0.0
    d = L.reduce_pairs({"a": jnp.asarray(vals[:3]), "b": jnp.ones(3)}, None)
    assert float(d["b"][0]) == 3.0 and float(d["a"][1]) == 3.0
    with pytest.raises(ValueError, match="pair_weights"):
        L.reduce_pairs(jnp.ones(3), jnp.ones(4))


def test_traced_beta_under_jit():
    """beta may be a traced value (e.g. scheduled); the result equals the Python-float call."""
    inp = _all_inputs()
    args = [inp[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
    traced = jax.jit(lambda beta: L.dpo_loss(*args, beta=beta)[0])(jnp.float32(0.3))
    np.testing.assert_allclose(traced, L.dpo_loss(*args, beta=0.3)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.simpo_loss(args[0], args[1], inp["chosen_lengths"], inp["rejected_lengths"], beta=0.0)
