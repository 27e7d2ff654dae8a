"""CausalLM(attn_mask=..., positions=...): packed and shared-prompt rows give the logits each
sequence gets alone (the two-row path, itself checked against transformers in test_models.py),
for every attention variant: plain causal (Llama), sliding window (Mistral), mixed sliding/full
layers with biases (Qwen2) and Gemma-2 (soft-capping, alternating windows, sandwich norms).
Windows shorter than the prompt check that windows follow positions, not row slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from poet_jax.models import ModelConfig
from poet_jax.models.transformer import segment_attention_mask

V = 96
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
CFGS = {
    "llama": ModelConfig(**BASE),
    "mistral_window3": ModelConfig(model_type="mistral", sliding_window=3,
                                   layer_types=("sliding_attention",) * 2, **BASE),
    "qwen2_mixed": ModelConfig(model_type="qwen2", qkv_bias=True, sliding_window=2,
                               layer_types=("sliding_attention", "full_attention"), **BASE),
    "gemma2": ModelConfig(model_type="gemma2", sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                          attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=12,
                          embed_scale=True, norm_offset=1.0, sandwich_norms=True, hidden_act="gelu_pytorch_tanh",
                          tie_word_embeddings=True, **BASE),
}


def _model(name, **kw):
    return random_model(CFGS[name], 3, **kw)


@jax.jit
def _forward(graphdef, state, ids, second, mask):
    model = nnx.merge(graphdef, state)
    if mask is None:
        return model(ids, attention_mask=second)
    return model(ids, positions=second, attn_mask=mask)


def _run(model, ids, second, mask=None):
    """Jitted forward: ``second`` is the padding mask (mask None) or the positions."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, ids, second, mask))


@pytest.mark.parametrize("name", list(CFGS))
def test_packed_and_shared_rows_match_separate_sequences(name):
    rs = np.random.RandomState(0)
    model = _model(name)
    a, b = rs.randint(1, V, 7), rs.randint(1, V, 5)
    p, c, r = rs.randint(1, V, 6), rs.randint(1, V, 4), rs.randint(1, V, 5)
    # row 0: packed [a | b | pad x3]; row 1: shared prompt [p | c | r] + pad
    T = 15
    ids = np.zeros((2, T), np.int32)
    pos = np.zeros((2, T), np.int32)
    seg = np.zeros((2, T), np.int32)
    br = np.zeros((2, T), np.int32)
    ids[0, :12] = np.concatenate([a, b])
    pos[0, :12] = np.concatenate([np.arange(7), np.arange(5)])
    seg[0, :12] = [1] * 7 + [2] * 5
    ids[1, :15] = np.concatenate([p, c, r])
    pos[1, :15] = np.concatenate([np.arange(10), 6 + np.arange(5)])
    seg[1, :15] = 1
    br[1, 6:10], br[1, 10:15] = 1, 2
    got = _run(model, ids, pos, segment_attention_mask(seg, br))
    # reference: the four sequences alone, right-padded in one ordinary causal batch
    alone_ids = np.zeros((4, T), np.int32)
    alone_mask = np.zeros((4, T), np.int32)
    for i, s in enumerate([a, b, np.concatenate([p, c]), np.concatenate([p, r])]):
        alone_ids[i, : len(s)], alone_mask[i, : len(s)] = s, 1
    ref = _run(model, alone_ids, alone_mask)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[0, :7], ref[0, :7], **tol)
    np.testing.assert_allclose(got[0, 7:12], ref[1, :5], **tol)
    np.testing.assert_allclose(got[1, :10], ref[2, :10], **tol)
    np.testing.assert_allclose(got[1, 10:15], ref[3, 6:11], **tol)
    if name != "mistral_window3":
        return
    # [B,1,T,T] masks; the cuDNN-style setting falls back to the mask path
    seqlen = _model(name, attn_implementation="xla_seqlen")
    again = _run(seqlen, ids, pos, segment_attention_mask(seg, br)[:, None])
    np.testing.assert_allclose(again, got, rtol=1e-6, atol=1e-6)


def test_a_wrong_mask_changes_the_logits():
    """The comparison above can fail: without branch ids rejected tokens see the chosen ones."""
    rs = np.random.RandomState(1)
    model = _model("llama")
    ids = rs.randint(1, V, (1, 9)).astype(np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 3, 4, 5, 6]], np.int32)
    seg = np.ones((1, 9), np.int32)
    br = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]], np.int32)
    good = _run(model, ids, pos, segment_attention_mask(seg, br))
    bad = _run(model, ids, pos, segment_attention_mask(seg))
    np.testing.assert_allclose(good[0, :5], bad[0, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(good[0, 5:] - bad[0, 5:]).max() > 1e-3


def test_attn_mask_errors():
    model = _model("llama")
    ids = np.ones((2, 4), np.int32)
    m = jnp.ones((2, 4, 4), bool)
    with pytest.raises(ValueError, match="explicit positions"):
        model(ids, attn_mask=m)
    with pytest.raises(ValueError, match=r"attn_mask must be \[B,T,T\]"):
        model(ids, positions=np.zeros((2, 4), np.int32), attn_mask=jnp.ones((2, 4, 3), bool))
    with pytest.raises(ValueError, match="singleton head axis"):
        model(ids, positions=np.zeros((2, 4), np.int32), attn_mask=jnp.ones((2, 2, 4, 4), bool))
    with pytest.raises(ValueError, match="positions has shape"):
        model(ids, positions=np.zeros((2, 3), np.int32), attn_mask=m)
