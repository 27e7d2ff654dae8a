"""KV-cache generation vs repeated full forward passes; sampling controls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax.models import CausalLM, ModelConfig, generate, sample_logits

V, T, N = 96, 7, 6


def _model(family):
    if family == "llama":
        cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
                          num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    else:  # Gemma-2: soft-capped attention, window shorter than prompt + generation
        cfg = ModelConfig(model_type="gemma2", vocab_size=V, hidden_size=32, intermediate_size=64,
                          num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                          sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                          attn_logit_softcapping=5.0, final_logit_softcapping=10.0, query_pre_attn_scalar=8,
                          embed_scale=True, norm_offset=1.0, sandwich_norms=True, hidden_act="gelu_pytorch_tanh")
    model = CausalLM(cfg, rngs=nnx.Rngs(1))
    # larger weights than the 0.02 init so that greedy choices are not near ties
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(var.get_value() * 10.0 if var.get_value().ndim > 1 else var.get_value())
    return model


def _prompts():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, size=(3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[1, :3] = 0  # different prompt lengths, left-padded
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def _reference_greedy(model, ids, mask, n):
    """Argmax of full (uncached) forward passes over a fixed [B, T+n] buffer."""
    B = ids.shape[0]
    buf = np.concatenate([ids, np.zeros((B, n), np.int32)], 1)
    bmask = np.concatenate([mask, np.zeros((B, n), np.int32)], 1)
    fwd = nnx.jit(lambda m, x, a: m(x, a))
    out = []
    for i in range(n):
        logits = np.asarray(fwd(model, buf, bmask))[:, T + i - 1]
        tok = logits.argmax(-1)
        buf[:, T + i], bmask[:, T + i] = tok, 1
        out.append(tok)
    return np.stack(out, 1)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_greedy_equals_full_forward_argmax(family):
    model = _model(family)
    ids, mask = _prompts()
    ref = _reference_greedy(model, ids, mask, N)
    res = generate(model, ids, mask, max_new_tokens=N, eos_token_ids=(), pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(res.sequences), ref)
    np.testing.assert_array_equal(np.asarray(res.lengths), [N] * 3)

    # stop at an end token: row 0 emits ref[0, 2] at step 2 -> kept, then padding
    eos = int(ref[0, 2])
    res = generate(model, ids, mask, max_new_tokens=N, eos_token_ids=(eos,), pad_token_id=V - 1)
    seq = np.asarray(res.sequences)
    for b in range(3):
        hits = np.nonzero(ref[b] == eos)[0]
        k = int(hits[0]) + 1 if len(hits) else N
        np.testing.assert_array_equal(seq[b, :k], ref[b, :k])
        assert (seq[b, k:] == V - 1).all()
        assert int(res.lengths[b]) == k


def test_sampling_controls():
    model = _model("llama")
    ids, mask = _prompts()
    greedy = np.asarray(generate(model, ids, mask, max_new_tokens=N, eos_token_ids=()).sequences)
    kw = dict(max_new_tokens=N, eos_token_ids=(), temperature=1.0)
    a = generate(model, ids, mask, rng=jax.random.key(3), **kw).sequences
    b = generate(model, ids, mask, rng=jax.random.key(3), **kw).sequences
    c = generate(model, ids, mask, rng=jax.random.key(4), **kw).sequences
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    k1 = generate(model, ids, mask, rng=jax.random.key(5), top_k=1, **kw).sequences
    np.testing.assert_array_equal(np.asarray(k1), greedy)
    p0 = generate(model, ids, mask, rng=jax.random.key(6), top_p=1e-6, **kw).sequences
    np.testing.assert_array_equal(np.asarray(p0), greedy)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, mask, max_new_tokens=2, top_p=0.0)


def test_no_retrace_for_same_shapes():
    from poet_jax.models.generate import _generate_jit

    model = _model("llama")
    ids, mask = _prompts()
    generate(model, ids, mask, max_new_tokens=3, eos_token_ids=())
    n = _generate_jit._cache_size()
    generate(model, ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=3, eos_token_ids=())
    assert _generate_jit._cache_size() == n


def test_sample_logits_top_k_top_p_support():
    """Empirical support of the filters on a known distribution (probs .5 .3 .15 .05)."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    toks = np.asarray(sample_logits(logits, keys, do_sample=True, top_k=2))
    assert set(toks) == {0, 1}
    np.testing.assert_allclose((toks == 0).mean(), 0.5 / 0.8, atol=0.03)
    toks = np.asarray(sample_logits(logits, keys, do_sample=True, top_p=0.85, use_top_p=True))
    assert set(toks) == {0, 1, 2}  # .5 + .3 < .85 <= .5 + .3 + .15
    np.testing.assert_allclose((toks == 2).mean(), 0.15 / 0.95, atol=0.03)
    toks = np.asarray(sample_logits(logits, keys, do_sample=True, temperature=1.0))
    np.testing.assert_allclose(np.bincount(toks, minlength=4) / len(toks), [0.5, 0.3, 0.15, 0.05], atol=0.03)
