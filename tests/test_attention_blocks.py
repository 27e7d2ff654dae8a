"""Blocked causal attention (``transformer.blocked_causal_attention``, the default path of
``attention(..., causal_blocks=True)``) is exact and really skips work.

- Op level: equal to ``jax.nn.dot_product_attention(mask=..., implementation="xla")`` (the full
  ``T x T`` reference) for T in {1, 127, 128, 300, 384} with block 128 (called through
  ``attention(causal_blocks=True)``; GQA 4/2 heads and plain multi-head 2/2) and T in
  {1, 15, 16, 37, 48} with block 16 (GQA); each batch stacks right-padded rows
  (``build_masks``), packed rows with segments and branches
  (``custom_masks(segment_attention_mask(...))``) and sliding-window rows
  (``build_masks(window=...)``). Also bf16 inputs, and Gemma-2 soft-capping against an
  independent float64 numpy reference.
- Gradients w.r.t. q, k, v equal the full path's (block 128 at T=300, block 16 at T=48).
- Whole model at T=300: ``CausalLM`` logits with the default implementation (blocked) equal
  ``attn_implementation="xla"`` (full mask) and ``"xla_seqlen"`` on right-padded rows (Llama);
  on packed rows through ``attn_mask=`` + ``positions=`` (Mistral, window 50) the logits and
  every parameter's gradient of a next-token log-likelihood match too (rel 1e-5).
- It skips work: at T=512 the compiled blocked attention has < 0.75x the FLOPs (XLA cost
  analysis) of the unblocked and of the ``"xla"`` one, and its traced matmuls are exactly
  (n+1)/(2n) of the full square's (n = 4 blocks).

Query rows whose mask row is empty (only padding slots far beyond a sliding window) are
excluded: they are padding whose output is never used, and the two paths average different
(masked) key ranges there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax.models import CausalLM, ModelConfig
from poet_jax.models import transformer as T

HD = 16
SCALE = HD**-0.5
TS = (1, 127, 128, 300, 384)


# ---------------------------------------------------------------------------- helpers


def _lengths(t: int) -> np.ndarray:
    """Right-padded row lengths: one full row, two shorter ones."""
    return np.array([t, max(1, (2 * t) // 3 + 1), max(1, t // 3)])


def _packed(t: int, rs: np.random.RandomState, rows: int = 3):
    """Packed rows: several segments (random lengths), some with a shared prompt (branch 0)
    followed by two branches (1, 2), then padding (segment 0). Returns segment, branch, positions."""
    seg = np.zeros((rows, t), np.int32)
    br = np.zeros((rows, t), np.int32)
    pos = np.zeros((rows, t), np.int32)
    for b in range(rows):
        s, sid, end = 0, 1, t - (b * t) // 7  # row b ends with about b*t/7 slots of padding
        while s < end:
            n = min(end - s, int(rs.randint(1, max(2, t // 3))))
            seg[b, s:s + n] = sid
            if n >= 6 and sid % 2:  # prompt | branch 1 | branch 2 (branch 2 restarts after the prompt)
                a, c = n // 3, (2 * n) // 3
                br[b, s + a:s + c], br[b, s + c:s + n] = 1, 2
                pos[b, s:s + c] = np.arange(c)
                pos[b, s + c:s + n] = a + np.arange(n - c)
            else:
                pos[b, s:s + n] = np.arange(n)
            s, sid = s + n, sid + 1
    return seg, br, pos


def _masks(t: int, seed: int = 0) -> np.ndarray:
    """``[9,T,T]`` bool: 3 right-padded rows (``build_masks``), 3 packed rows with segments and
    branches (``custom_masks(segment_attention_mask(...))``), 3 right-padded rows with a sliding
    window (``build_masks(window=...)``; 40, or 5 when T <= 64)."""
    seg, br, pos = _packed(t, np.random.RandomState(seed))
    packed, _ = T.custom_masks(T.segment_attention_mask(seg, br), jnp.asarray(pos), None, None)
    valid = jnp.asarray(np.arange(t)[None] < _lengths(t)[:, None])
    pad, local = T.build_masks(valid, jnp.arange(t), 40 if t > 64 else 5)
    m = np.concatenate([np.asarray(pad), np.asarray(packed), np.asarray(local)])
    return m


def _qkv(t: int, heads: int, kv_heads: int, seed: int = 0, dtype=jnp.float32, batch: int = 9):
    rs = np.random.RandomState(seed)
    q = rs.standard_normal((batch, t, heads, HD)).astype(np.float32)
    k = rs.standard_normal((batch, t, kv_heads, HD)).astype(np.float32)
    v = rs.standard_normal((batch, t, kv_heads, HD)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@functools.partial(jax.jit, static_argnames=("block", "softcap"))
def _blocked(q, k, v, mask, block=T.ATTN_BLOCK, softcap=None):
    """Block 128: through ``attention(causal_blocks=True)``, the call the decoder layer makes."""
    if block == T.ATTN_BLOCK:
        return T.attention(q, k, v, mask, SCALE, softcap, causal_blocks=True)
    return T.blocked_causal_attention(q, k, v, mask, SCALE, softcap, block=block)


@jax.jit
def _full(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=SCALE, implementation="xla")


def _numpy_attention(q, k, v, mask, scale, softcap):
    """float64 reference: tanh-softcapped scores, masked softmax, GQA by repeating kv heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    m = np.broadcast_to(mask[:, None], s.shape)
    top = np.where(m, s, -np.inf).max(-1, keepdims=True)
    p = np.where(m, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)  # empty mask rows: 0 (they are never compared)
    return np.einsum("bhts,bshd->bthd", p, v)


def _assert_rows_close(got, want, rows, tol):
    """Max abs difference on the selected ``rows [B,T]`` within ``tol`` x max(1, max|want|)."""
    got, want = np.asarray(got, np.float64)[rows], np.asarray(want, np.float64)[rows]
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= tol * max(1.0, np.abs(want).max()), err


# ---------------------------------------------------------------------------- op level

# block 128 at the lengths of interest; block 16 at the same boundary cases scaled down (1 block,
# block - 1, one full block, several blocks with a partial last one, several whole blocks)
CASES = [(t, T.ATTN_BLOCK) for t in TS] + [(t, 16) for t in (1, 15, 16, 37, 48)]


@pytest.mark.parametrize("t,block", CASES)
def test_blocked_equals_full_mask_attention(t, block):
    mask = _masks(t)
    rows = mask.any(-1)
    if t >= 48:
        assert not rows[6:].all()  # window rows far past a row's end are empty (excluded)
    for heads, kv_heads in ((4, 2), (2, 2)) if block == T.ATTN_BLOCK else ((4, 2),):
        q, k, v = _qkv(t, heads, kv_heads, seed=t)
        want = _full(q, k, v, mask)
        got = _blocked(q, k, v, mask, block=block)
        assert got.shape == want.shape and got.dtype == jnp.float32
        _assert_rows_close(got, want, rows, 1e-5)


@pytest.mark.parametrize("t,block", [(300, T.ATTN_BLOCK), (48, 16)])
def test_blocked_bf16_and_softcap(t, block):
    mask = _masks(t, seed=1)
    rows = mask.any(-1)
    q, k, v = _qkv(t, 4, 2, seed=5)
    # bf16 inputs: against the full path in bf16 and the float64 result on the same (rounded) inputs
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = _blocked(qb, kb, vb, mask, block=block)
    assert got.dtype == jnp.bfloat16
    _assert_rows_close(got, _full(qb, kb, vb, mask), rows, 2e-2)
    _assert_rows_close(got, _numpy_attention(qb, kb, vb, mask, SCALE, None), rows, 2e-2)
    # Gemma-2 soft-capping (jax.nn.dot_product_attention has none): an independent numpy reference
    q3 = q * 3.0  # large scores so that the cap matters
    capped = _numpy_attention(q3, k, v, mask, SCALE, 2.0)
    _assert_rows_close(_blocked(q3, k, v, mask, block=block, softcap=2.0), capped, rows, 1e-5)
    assert np.abs(capped - _numpy_attention(q3, k, v, mask, SCALE, None))[rows].max() > 1e-2  # the cap matters


@pytest.mark.parametrize("t,block", [(300, T.ATTN_BLOCK), (48, 16)])
def test_blocked_gradients_equal_full(t, block):
    mask = _masks(t, seed=2)
    rows = mask.any(-1)
    q, k, v = _qkv(t, 4, 2, seed=7)
    # weights zero on empty-mask rows (their outputs differ between the paths and are never used)
    w = jnp.asarray(np.random.RandomState(3).standard_normal(q.shape) * rows[:, :, None, None], jnp.float32)
    m = jnp.asarray(mask)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v, m)), argnums=(0, 1, 2)))(q, k, v)

    want = grads(_full)
    got = grads(functools.partial(_blocked, block=block))
    for g, r, name in zip(got, want, "qkv"):
        r, g = np.asarray(r), np.asarray(g)
        assert np.abs(r).max() > 0, name
        err = np.abs(g - r).max()
        assert err <= 1e-5 * np.abs(r).max(), (name, err)


# ---------------------------------------------------------------------------- whole model

MODEL_T = 300
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=512)
CFG_WINDOW = CFG.replace(model_type="mistral", sliding_window=50, layer_types=("sliding_attention",) * 2)


def _random_state(cfg: ModelConfig, seed: int = 0):
    """Graph and a numpy-drawn parameter state (normal 0.1, q/k 0.3 so attention is peaked;
    norms 1 + normal 0.1), without eager-init compiles."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rs = np.random.RandomState(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        std = 0.3 if ("q_proj" in name or "k_proj" in name) else 0.1
        return jnp.asarray(rs.normal(0.0, std, a.shape).astype(np.float32) + ("norm" in name))

    return graphdef, jax.tree_util.tree_map_with_path(draw, state)


def _graphdef(cfg: ModelConfig, impl):
    return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), attn_implementation=impl)))[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(graphdef, state, ids, second, attn_mask):
    """Logits; ``second`` is the padding mask (attn_mask None) or the positions."""
    model = nnx.merge(graphdef, state)
    if attn_mask is None:
        return model(ids, attention_mask=second)
    return model(ids, positions=second, attn_mask=attn_mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_and_grad(graphdef, state, ids, second, attn_mask, weights):
    """Logits and d(mean log-likelihood of the next tokens where ``weights``)/d(params)."""

    def fwd(st):
        logits = _logits(graphdef, st, ids, second, attn_mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(tok * weights[:, 1:]) / jnp.sum(weights[:, 1:]), logits

    (_, logits), grad = jax.value_and_grad(fwd, has_aux=True)(state)
    return logits, grad


def test_model_blocked_matches_full_mask_right_padded():
    """Llama, rows of 300, 211 and 45 real tokens right-padded to T=300: default (blocked) logits ==
    attn_implementation="xla" (full mask) == "xla_seqlen" (the cuDNN formulation) on real tokens."""
    t = MODEL_T
    real = np.arange(t)[None] < np.array([t, 211, 45])[:, None]
    ids = jnp.asarray(np.where(real, np.random.RandomState(0).randint(3, CFG.vocab_size, (3, t)), 0), jnp.int32)
    att = jnp.asarray(real, jnp.int32)
    _, state = _random_state(CFG)
    want = np.asarray(_logits(_graphdef(CFG, "xla"), state, ids, att, None))
    assert want[real].std() > 0.1  # non-trivial logits
    got = _logits(_graphdef(CFG, None), state, ids, att, None)
    _assert_rows_close(got, want, real, 1e-5)
    _assert_rows_close(_logits(_graphdef(CFG, "xla_seqlen"), state, ids, att, None), want, real, 1e-5)


def test_model_blocked_matches_full_mask_packed_logits_and_grads():
    """Mistral with a 50-token sliding window, packed rows (segments, shared-prompt branches,
    positions restarting per sequence) of T=300 via attn_mask + positions: default (blocked) ==
    "xla" (full mask) for the logits on real tokens and for every parameter's gradient of the
    mean next-token log-likelihood (rel 1e-5)."""
    t, cfg = MODEL_T, CFG_WINDOW
    seg, br, pos = _packed(t, np.random.RandomState(4))
    real = seg > 0
    ids = jnp.asarray(np.where(real, np.random.RandomState(5).randint(3, cfg.vocab_size, (3, t)), 0), jnp.int32)
    mask = T.segment_attention_mask(seg, br)
    w = jnp.asarray(real, jnp.float32)
    _, state = _random_state(cfg)
    want, gwant = _logits_and_grad(_graphdef(cfg, "xla"), state, ids, jnp.asarray(pos), mask, w)
    got, ggot = _logits_and_grad(_graphdef(cfg, None), state, ids, jnp.asarray(pos), mask, w)
    assert np.asarray(want)[real].std() > 0.1
    _assert_rows_close(got, want, real, 1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(gwant)
    assert len(leaves) == len(jax.tree_util.tree_leaves(ggot)) >= 10
    for (path, r), g in zip(leaves, jax.tree_util.tree_leaves(ggot)):
        r, g = np.asarray(r), np.asarray(g)
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)
        err = np.abs(g - r).max()
        assert err <= 1e-5 * np.abs(r).max(), (jax.tree_util.keystr(path), err)


# ---------------------------------------------------------------------------- work skipped


def _jaxpr_dot_flops(jaxpr) -> int:
    """2 x (output size) x (contracted size) summed over every dot_general, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lc]))
        for p in eqn.params.values():
            if isinstance(p, jax.extend.core.ClosedJaxpr):
                total += _jaxpr_dot_flops(p.jaxpr)
            elif isinstance(p, jax.extend.core.Jaxpr):
                total += _jaxpr_dot_flops(p)
    return total


def _xla_flops(fn, *args) -> float:
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def test_blocked_attention_skips_key_blocks_above_the_diagonal():
    t, hd = 512, 64
    rs = np.random.RandomState(0)
    q = jnp.asarray(rs.standard_normal((1, t, 4, hd)), jnp.float32)
    k = jnp.asarray(rs.standard_normal((1, t, 2, hd)), jnp.float32)
    v = jnp.asarray(rs.standard_normal((1, t, 2, hd)), jnp.float32)
    mask = T.build_masks(jnp.ones((1, t), bool), jnp.arange(t), None)[0]
    blocked = functools.partial(T.attention, scale=hd**-0.5, causal_blocks=True)
    unblocked = functools.partial(T.attention, scale=hd**-0.5, causal_blocks=False)
    reference = functools.partial(T.attention, scale=hd**-0.5, implementation="xla")
    args = (q, k, v, mask)
    # XLA's own count of the compiled programs (4 blocks of 128: about 5/8 of the square)
    xb, xu, xr = (_xla_flops(f, *args) for f in (blocked, unblocked, reference))
    assert xb < 0.75 * xu and xb < 0.75 * xr, (xb, xu, xr)
    # the traced matmuls: exactly (n+1)/(2n) of the square's score and value products
    jb, ju = (_jaxpr_dot_flops(jax.make_jaxpr(f)(*args).jaxpr) for f in (blocked, unblocked))
    assert ju == 2 * (2 * 4 * t * t * hd)
    n = t // T.ATTN_BLOCK
    assert jb == ju * (n + 1) // (2 * n)
