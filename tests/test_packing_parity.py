"""Shared-prompt rows, packing, and both, give the same per-pair log-probs, DPO / SimPO losses
and parameter gradients as the plain two-row path (``PreferenceBatch`` + ``model(...)`` +
``losses.token_logps``) on the same pairs.

Real pairs: dpo_en_demo.json rendered with SmolLM2's chat template and tokenizer, cut to
unequal prompt / response lengths (prompt keeps its end, responses their start); a tiny
random Llama over SmolLM2's 49,152-token vocabulary as policy, another as the frozen
reference; fp32; POET off and on (``poet_truncate_example``, as the data pipeline does).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from poet_jax import losses
from poet_jax.data import DataConfig, build_preference_data, make_batch, poet_truncate_example
from poet_jax.data.packing import make_packed_batch, pack_pairs
from poet_jax.models import ModelConfig
from poet_jax.train.packed import packed_reference_logps, packed_sequence_logps

PROMPT = [5, 12, 3, 9, 7, 14]
CHOSEN = [10, 4, 16, 7, 12, 3]
REJECTED = [6, 13, 5, 15, 9, 8]
LAYOUTS = {  # name: (shared_prompt, rows, max_pairs_per_row, row_length, log-prob chunk); fixed shapes
    "shared_prompt": (True, 6, 1, 48, 0),
    "packed": (False, 3, 3, 80, 0),
    "packed_shared": (True, 3, 3, 64, 16),
}


@pytest.fixture(scope="module")
def pairs(smollm2_tokenizer, shared_data):
    cfg = DataConfig(path=str(shared_data / "dpo_en_demo.json"), max_length=None, max_prompt_length=None,
                     show_progress=False, max_records=len(PROMPT), bucket_lengths=())
    exs = build_preference_data(cfg, smollm2_tokenizer).train_examples
    out = [e.replace(prompt_ids=e.prompt_ids[-p:], chosen_ids=e.chosen_ids[:c], rejected_ids=e.rejected_ids[:r])
           for e, p, c, r in zip(exs, PROMPT, CHOSEN, REJECTED)]
    assert [len(e.prompt_ids) for e in out] == PROMPT  # unequal prompt lengths
    assert [len(e.chosen_ids) for e in out] == CHOSEN and [len(e.rejected_ids) for e in out] == REJECTED
    return out


@pytest.fixture(scope="module")
def models(smollm2_tokenizer):
    cfg = ModelConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=1e5)
    policy, ref = random_model(cfg, 0), random_model(cfg, 1)
    graphdef, params = nnx.split(policy)
    return graphdef, params, nnx.split(ref)[1]


def _losses(pc, pr, nc, nr, rc, rr, valid):
    """Mean DPO (beta 0.1) and SimPO (beta 2, gamma/beta 0.5) losses over valid pairs."""
    dpo, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    simpo, _ = losses.simpo_loss(pc, pr, nc, nr, beta=2.0, gamma_beta_ratio=0.5)
    v = valid.astype(jnp.float32)
    return jnp.sum(dpo * v) / jnp.sum(v), jnp.sum(simpo * v) / jnp.sum(v)


def _plain_logps(model, b):
    """The two-row reference: [2B] summed response log-probs and token counts."""
    logits = model(b["input_ids"], b["attention_mask"])
    tlp = losses.token_logps(logits[:, :-1], b["input_ids"][:, 1:])
    mask = b["response_mask"][:, 1:]
    return losses.sequence_logps(tlp, mask), jnp.sum(mask, axis=-1).astype(jnp.float32)


def _value_and_grads(objective, params):
    """Both losses, aux, and the gradients of each loss: one forward, one batched backward."""
    out, vjp, aux = jax.vjp(objective, params, has_aux=True)
    grads = jax.vmap(vjp)(jnp.eye(2, dtype=out.dtype))[0]
    return out, aux, jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)


@jax.jit
def _plain(graphdef, params, ref_params, b):
    n = b["pair_valid"].shape[0]
    rl, _ = _plain_logps(nnx.merge(graphdef, ref_params), b)

    def objective(p):
        lp, cnt = _plain_logps(nnx.merge(graphdef, p), b)
        return jnp.stack(_losses(lp[:n], lp[n:], cnt[:n], cnt[n:], rl[:n], rl[n:], b["pair_valid"])), (lp, cnt)

    out, (lp, cnt), g_dpo, g_simpo = _value_and_grads(objective, params)
    return lp, cnt, out, g_dpo, g_simpo


@partial(jax.jit, static_argnums=(4,))
def _packed(graphdef, params, ref_params, b, chunk):
    ref = packed_reference_logps(graphdef, ref_params, None, b, chunk=16)
    n = ref.shape[0] // 2
    valid = b["pair_valid"].reshape(-1)

    def objective(p):
        pc, pr, nc, nr = packed_sequence_logps(nnx.merge(graphdef, p), b, chunk=chunk)
        out = jnp.stack(_losses(pc, pr, nc, nr, ref[:n], ref[n:], valid))
        return out, (jnp.concatenate([pc, pr]), jnp.concatenate([nc, nr]))

    out, (lp, cnt), g_dpo, g_simpo = _value_and_grads(objective, params)
    return lp, cnt, out, g_dpo, g_simpo


def _assert_tree_close(a, b, rel=1e-5):
    """Every leaf: max |a - b| <= rel * max |b| (observed: ~1e-6)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= rel * np.abs(y).max(), (np.abs(x - y).max(), np.abs(y).max())


@pytest.mark.parametrize("use_poet", [False, True], ids=["poet_off", "poet_on"])
def test_layouts_match_two_row_path(pairs, models, use_poet):
    graphdef, params, ref_params = models
    exs = [poet_truncate_example(e) for e in pairs] if use_poet else pairs
    if use_poet:
        assert [len(e.chosen_ids) for e in exs] == [min(c, r) for c, r in zip(CHOSEN, REJECTED)]
    B = len(exs)
    plain = make_batch(exs, list(range(B)), None, pad_id=2, length=40)
    lp0, cnt0, (dpo0, simpo0), gd0, gs0 = _plain(graphdef, params, ref_params, plain.as_dict())
    assert np.isfinite(float(dpo0)) and np.isfinite(float(simpo0))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gd0))  # every parameter gets a gradient
    plain_slots = plain.input_ids.size
    for name, (shared, rows, m, length, chunk) in LAYOUTS.items():
        plan = pack_pairs(exs, range(B), num_rows=rows, row_length=length, max_pairs_per_row=m, shared_prompt=shared)
        pb = make_packed_batch(exs, plan, pad_id=2, row_length=length, shared_prompt=shared)
        assert pb.num_real_tokens < int(plain.attention_mask.sum()) or not shared
        if m > 1:
            assert pb.input_ids.size < plain_slots, name  # packing removes padding
        lp, cnt, (dpo, simpo), gd, gs = _packed(graphdef, params, ref_params, pb.as_dict(), chunk)
        # per-pair values back in example order
        idx = pb.example_index.reshape(-1)
        n = idx.size
        order = np.argsort(np.where(idx >= 0, idx, n + np.arange(n)))[:B]
        got = np.concatenate([np.asarray(lp[:n])[order], np.asarray(lp[n:])[order]])
        np.testing.assert_allclose(got, np.asarray(lp0), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(np.concatenate([np.asarray(cnt[:n])[order], np.asarray(cnt[n:])[order]]), cnt0)
        np.testing.assert_allclose(float(dpo), float(dpo0), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(simpo), float(simpo0), rtol=1e-5, err_msg=name)
        _assert_tree_close(gd, gd0)
        _assert_tree_close(gs, gs0)
