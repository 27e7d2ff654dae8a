"""Golden tests against TRL 1.16's own code (PyTorch).

TRL 1.16 has no standalone ``dpo_loss`` method: the loss lives inside
``DPOTrainer._compute_loss``. We call that method unbound on a minimal stand-in ``self``
whose "model" returns fixed per-token log-probs, so TRL's own masking, ``ld_alpha``
(LD-DPO) handling, loss formulas and metric code run on our numbers. CPO's
``cpo_loss`` and ORPO's ``odds_ratio_loss`` are called the same way.
"""

from __future__ import annotations

import os
import types
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from poet_jax import losses as L  # noqa: E402


class _FixedLogpModel:
    """Stands in for a causal LM: returns given per-token log-probs (zero off the completion)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor):
        self.lp = per_token_logps

    def __call__(self, **kwargs):
        rows, t1 = self.lp.shape
        zeros = torch.zeros(rows, t1)
        return types.SimpleNamespace(log_probs=self.lp, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(rows, t1, dtype=torch.bool))


def _trl_dpo(policy_lp, ref_lp, completion_mask, loss_type, beta, ls, ld_alpha=None):
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = types.SimpleNamespace(
        model=_FixedLogpModel(policy_lp), ref_model=_FixedLogpModel(ref_lp), accelerator=acc,
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=ls,
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None), use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    rows, t = completion_mask.shape
    inputs = {"input_ids": torch.ones(rows, t, dtype=torch.long),
              "attention_mask": torch.ones(rows, t, dtype=torch.long), "completion_mask": completion_mask}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(fake, fake.model, inputs, False)
    return float(loss), {k: v[0] for k, v in fake._metrics["train"].items()}


def _batch(seed, b, t):
    """Right-padded rows [chosen..., rejected...] with unequal prompt and response lengths."""
    rng = np.random.default_rng(seed)
    cm = np.zeros((2 * b, t), np.int64)
    for i in range(2 * b):
        p = rng.integers(1, 4)
        n = rng.integers(1, t - p + 1)
        cm[i, p:p + n] = 1
    shift = cm[:, 1:]
    lp = (-rng.uniform(0.05, 3.0, shift.shape) * shift).astype(np.float32)
    ref = (lp + rng.normal(0, 0.5, shift.shape) * shift).astype(np.float32)
    return cm, lp, ref


def _ours(lp, ref, mask, loss_type, beta, ls, poet=False):
    b = mask.shape[0] // 2
    mask = jnp.asarray(mask)
    mc, mr = mask[:b], mask[b:]
    if poet:
        mc, mr = L.poet_mask(mc, mr)
    lp, ref = jnp.asarray(lp), jnp.asarray(ref)
    kw = {"label_smoothing": ls} if loss_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") else {}
    return L.dpo_loss(
        L.sequence_logps(lp[:b], mc), L.sequence_logps(lp[b:], mr),
        L.sequence_logps(ref[:b], mc), L.sequence_logps(ref[b:], mr),
        beta=beta, loss_type=loss_type, chosen_lengths=L.response_lengths(mc),
        rejected_lengths=L.response_lengths(mr), **kw,
    )


_TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), beta=st.sampled_from([0.1, 0.5]))
@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_matches_trl_dpotrainer(loss_type, seed, beta):
    ls = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    cm, lp, ref = _batch(seed, 4, 10)
    want, trl_metrics = _trl_dpo(torch.tensor(lp), torch.tensor(ref), torch.tensor(cm), loss_type, beta, ls)
    loss, metrics = _ours(lp, ref, cm[:, 1:], loss_type, beta, ls)
    s, c = L.reduce_pairs(loss)
    np.testing.assert_allclose(float(s / c), want, rtol=1e-6, atol=2e-6)
    for key in _TRL_METRICS:
        ms, mc = L.reduce_pairs(metrics[key])
        np.testing.assert_allclose(float(ms / mc), trl_metrics[key], rtol=1e-6, atol=2e-6, err_msg=key)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6))
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "apo_zero"])
def test_poet_mask_equals_trl_ld_alpha_zero(loss_type, seed):
    """DPO+POET (our mask) == TRL's LD-DPO with ld_alpha=0 (shared prefix only)."""
    ls = 0.2 if loss_type == "robust" else 0.0
    cm, lp, ref = _batch(seed, 4, 12)
    want, trl_metrics = _trl_dpo(torch.tensor(lp), torch.tensor(ref), torch.tensor(cm), loss_type, 0.3, ls,
                                 ld_alpha=0.0)
    loss, metrics = _ours(lp, ref, cm[:, 1:], loss_type, 0.3, ls, poet=True)
    np.testing.assert_allclose(float(jnp.mean(loss)), want, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(float(jnp.mean(metrics["rewards/margins"])), trl_metrics["rewards/margins"],
                               rtol=1e-6, atol=2e-6)
    # and it differs from plain DPO on this batch (the masks do cut something)
    plain, _ = _ours(lp, ref, cm[:, 1:], loss_type, 0.3, ls, poet=False)
    b = cm.shape[0] // 2
    if not np.array_equal(cm[:b].sum(1), cm[b:].sum(1)):
        assert not np.allclose(np.asarray(plain), np.asarray(loss))


def _fake_cpo(loss_type, beta, ls, alpha, gamma):
    return types.SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=ls, alpha=alpha, simpo_gamma=gamma,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), loss_type=st.sampled_from(L.CPO_LOSS_TYPES), alpha=st.sampled_from([0.0, 0.3]))
def test_cpo_matches_trl(seed, loss_type, alpha):
    rng = np.random.default_rng(seed)
    n_c, n_r = rng.integers(1, 30, 5), rng.integers(1, 30, 5)
    avg_c, avg_r = -rng.uniform(0.05, 2.0, 5), -rng.uniform(0.05, 2.0, 5)
    ls = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    beta = 0.2
    # TRL receives per-token averages for ipo/simpo and sums otherwise
    avg_types = loss_type in ("ipo", "simpo")
    sum_c, sum_r = (avg_c * n_c).astype(np.float32), (avg_r * n_r).astype(np.float32)
    trl_in_c = torch.tensor(sum_c / n_c if avg_types else sum_c)
    trl_in_r = torch.tensor(sum_r / n_r if avg_types else sum_r)
    t_loss, t_cr, t_rr = CPOTrainer.cpo_loss(_fake_cpo(loss_type, beta, ls, alpha, 0.5), trl_in_c, trl_in_r)
    nll = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    loss, m = L.cpo_loss(jnp.asarray(sum_c), jnp.asarray(sum_r), jnp.asarray(nll), beta=beta, loss_type=loss_type,
                         label_smoothing=ls, cpo_alpha=1.0, simpo_gamma=0.5, alpha=alpha,
                         chosen_lengths=n_c, rejected_lengths=n_r)
    np.testing.assert_allclose(np.asarray(loss) - nll, t_loss.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], t_cr.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], t_rr.numpy(), rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6))
def test_orpo_matches_trl(seed):
    rng = np.random.default_rng(seed)
    n_c, n_r = rng.integers(1, 30, 6), rng.integers(1, 30, 6)
    # include averages on both sides of -ln 2 (the two branches of log1mexp)
    avg_c, avg_r = -rng.uniform(0.01, 3.0, 6), -rng.uniform(0.01, 3.0, 6)
    sum_c, sum_r = (avg_c * n_c).astype(np.float32), (avg_r * n_r).astype(np.float32)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    t_losses, t_cr, t_rr, t_ratio, t_odds = ORPOTrainer.odds_ratio_loss(
        fake, torch.tensor(sum_c / n_c), torch.tensor(sum_r / n_r))
    nll = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    loss, m = L.orpo_loss(jnp.asarray(sum_c), jnp.asarray(sum_r), jnp.asarray(nll), n_c, n_r, beta=0.25)
    # TRL: total loss = nll - mean(beta * log sigmoid(log_odds))
    np.testing.assert_allclose(np.asarray(loss), nll - t_losses.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(m["log_odds_ratio"])), float(t_ratio), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(m["log_odds_chosen"])), float(t_odds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], t_cr.numpy(), rtol=1e-5, atol=1e-6)
