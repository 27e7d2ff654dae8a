"""One Flax NNX decoder-only transformer for Llama / Mistral / Qwen2 / Qwen3 / Gemma-2.

Per-layer parameters are stacked with a leading ``layers`` axis; the layer loop is a
``lax.scan`` (``config.scan_layers=True``: compile time independent of depth) or a
Python loop over static slices. Gemma-2's alternating sliding/global layers scan a
per-layer boolean that selects the mask. Every parameter carries logical axis names in
its ``out_sharding`` metadata (see :mod:`poet_jax.sharding`).

Parameter layout (``L`` layers, ``D`` hidden, ``H``/``K`` query/kv heads, ``Hd`` head dim,
``F`` MLP width, ``V`` vocab): ``embed [V,D]``, ``lm_head [D,V]`` (untied only),
``final_norm [D]``; ``layers.q_proj [L,D,H,Hd]``, ``k_proj``/``v_proj [L,D,K,Hd]``,
``o_proj [L,H,Hd,D]``, ``gate_proj``/``up_proj [L,D,F]``, ``down_proj [L,F,D]``, norms ``[L,D]``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig

F32 = jnp.float32
_NEG = -1e30  # masked attention score (finite: fully masked rows give a uniform softmax, not NaN)


def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Per-layer parameter names -> (logical axes, shape), without the leading layers axis."""
    D, H, K, Hd, Fm = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    s: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
        "attn_norm": (("embed",), (D,)),
        "q_proj": (("embed", "heads", "head_dim"), (D, H, Hd)),
        "k_proj": (("embed", "kv_heads", "head_dim"), (D, K, Hd)),
        "v_proj": (("embed", "kv_heads", "head_dim"), (D, K, Hd)),
        "o_proj": (("heads", "head_dim", "embed"), (H, Hd, D)),
        "mlp_norm": (("embed",), (D,)),
        "gate_proj": (("embed", "mlp"), (D, Fm)),
        "up_proj": (("embed", "mlp"), (D, Fm)),
        "down_proj": (("mlp", "embed"), (Fm, D)),
    }
    if cfg.qkv_bias:
        s["q_bias"] = (("heads", "head_dim"), (H, Hd))
        s["k_bias"] = (("kv_heads", "head_dim"), (K, Hd))
        s["v_bias"] = (("kv_heads", "head_dim"), (K, Hd))
    if cfg.o_bias:
        s["o_bias"] = (("embed",), (D,))
    if cfg.qk_norm:
        s["q_norm"] = (("head_dim",), (Hd,))
        s["k_norm"] = (("head_dim",), (Hd,))
    if cfg.sandwich_norms:
        s["post_attn_norm"] = (("embed",), (D,))
        s["post_mlp_norm"] = (("embed",), (D,))
    return s


def top_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Non-layer parameter names -> (logical axes, shape)."""
    s = {
        "embed": (("vocab", "embed"), (cfg.vocab_size, cfg.hidden_size)),
        "final_norm": (("embed",), (cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        s["lm_head"] = (("embed", "vocab"), (cfg.hidden_size, cfg.vocab_size))
    return s


# ---------------------------------------------------------------------------- pure math


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32; returns ``x.dtype``.

    ``offset=0`` is Llama's ``w * norm(x)`` (cast before scaling); ``offset=1`` is Gemma's
    ``norm(x) * (1 + w)`` scaled in fp32.
    """
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (offset + w.astype(F32))).astype(x.dtype)
    return w.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[Hd/2]`` (fp32), with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float64)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """``positions [B,T]`` -> ``cos, sin [B,T,1,Hd]`` in ``dtype`` (angles computed in fp32)."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B,T,N,Hd]``."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


ATTN_BLOCK = 128  # query block of the blocked causal attention (see :func:`attention`)


def _masked_attention(q, k, v, mask, scale, softcap):
    """Grouped-query attention on one block: ``q [B,T,H,Hd]``, ``k, v [B,S,K,Hd]``, ``mask [B,T,S]``.

    Heads-major layout ``[B,K,G*T,Hd]`` (the ``G = H/K`` query heads sharing a key head are
    stacked along the query axis, so each kv head is one ``[G*T,Hd] x [Hd,S]`` matmul); scores
    and softmax in fp32, probabilities cast back to ``v.dtype``. Returns ``[B,T,H,Hd]``.
    """
    B, T, H, Hd = q.shape
    K = k.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, Hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Hd)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=F32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    m = jnp.broadcast_to(mask[:, None, None], (B, 1, G) + mask.shape[1:]).reshape(B, 1, G * T, -1)
    s = jnp.where(m, s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkqs,bksd->bkqd", p, vt)
    return o.reshape(B, K, G, T, Hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Hd)


def blocked_causal_attention(q, k, v, mask, scale, softcap=None, block: int = ATTN_BLOCK):
    """Causal attention computed block by block, skipping key blocks above the diagonal.

    ``q [B,T,H,Hd]``, ``k, v [B,T,K,Hd]`` (same slots, no cache), ``mask [B,T,T]`` bool that
    already contains row causality (``key slot <= query slot``), plus any padding, segment or
    window rule. Query block ``i`` (slots ``[i*block, (i+1)*block)``) only meets keys
    ``[0, (i+1)*block)``: every key it skips is masked anyway, so the result equals full
    masked attention while computing about ``(n+1)/(2n)`` of the ``T x T`` scores (``n``
    blocks). Returns ``[B,T,H,Hd]``.
    """
    T = q.shape[1]
    if T <= block:
        return _masked_attention(q, k, v, mask, scale, softcap)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        outs.append(_masked_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale,
                                      softcap))
    return jnp.concatenate(outs, axis=1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float,
    softcap: float | None = None,
    implementation: str | None = None,
    seq_lengths: jax.Array | None = None,
    window: int | None = None,
    causal_blocks: bool = False,
) -> jax.Array:
    """Grouped-query attention. ``q [B,T,H,Hd]``, ``k, v [B,S,K,Hd]``, ``mask [B,T,S]`` bool.

    * ``seq_lengths [B]`` given (right-padded rows, no cache): ``jax.nn.dot_product_attention``
      with ``is_causal`` + sequence lengths + ``local_window_size`` — the form cuDNN flash
      attention accepts (``implementation="cudnn"``); ``mask`` is ignored;
    * ``implementation="xla"`` (no soft-capping): ``jax.nn.dot_product_attention`` with the
      boolean mask, the full ``T x S`` score matrix;
    * otherwise (``None``): explicit fp32 scores (Gemma-2 soft-capping included); with
      ``causal_blocks`` (no KV cache, ``mask`` holds row causality) by query blocks that skip
      the key blocks above the diagonal (:func:`blocked_causal_attention`).

    Returns ``[B,T,H,Hd]`` in ``q.dtype``.
    """
    if softcap is None and seq_lengths is not None:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True,
            query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation,
        )
    if softcap is None and implementation is not None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, implementation=implementation
        )
    if causal_blocks and q.shape[1] == k.shape[1]:
        return blocked_causal_attention(q, k, v, mask, scale, softcap).astype(q.dtype)
    return _masked_attention(q, k, v, mask, scale, softcap).astype(q.dtype)


def _act(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    return lambda x: jax.nn.gelu(x, approximate=False)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B,T]`` positions ``cumsum(mask) - 1`` clipped at 0 (left padding starts at 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def build_masks(
    key_valid: jax.Array, q_slots: jax.Array, window: int | None
) -> tuple[jax.Array, jax.Array]:
    """Causal+padding masks by cache slot. ``key_valid [B,S]``, ``q_slots [T]`` -> two ``[B,T,S]``.

    The second also applies the sliding window (``q - window < k``); equal to the first
    when ``window`` is None.
    """
    S = key_valid.shape[-1]
    k_slots = jnp.arange(S)
    causal = k_slots[None, :] <= q_slots[:, None]
    full = causal[None] & key_valid.astype(bool)[:, None, :]
    if window is None:
        return full, full
    local = full & (k_slots[None, :] > q_slots[:, None] - window)[None]
    return full, local


def segment_attention_mask(segment_ids: jax.Array, branch_ids: jax.Array | None = None) -> jax.Array:
    """Block mask ``[B,T,T]`` bool (True = query ``t`` may attend key ``s``) for packed rows.

    ``segment_ids [B,T]`` int: tokens attend only within their own segment (0 is the
    padding segment: padding attends padding, never real tokens). ``branch_ids [B,T]``
    int (optional): within a segment, branch 0 is shared (e.g. a prompt) and visible to
    every branch; a token of branch ``b > 0`` sees only branch 0 and branch ``b``
    (chosen = 1 never sees rejected = 2 and vice versa). Causality is not included here:
    the model always intersects with ``key_slot <= query_slot``.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    m = seg[:, :, None] == seg[:, None, :]
    if branch_ids is not None:
        br = jnp.asarray(branch_ids, jnp.int32)
        bq, bk = br[:, :, None], br[:, None, :]
        m = m & ((bk == 0) | (bk == bq))
    return m


def custom_masks(
    attn_mask: jax.Array, positions: jax.Array, key_valid: jax.Array | None, window: int | None
) -> tuple[jax.Array, jax.Array]:
    """Full and sliding-window ``[B,T,T]`` masks for a caller-given ``attn_mask``.

    ``attn_mask [B,T,T]`` or ``[B,1,T,T]`` bool is intersected with row causality
    (``key_slot <= query_slot``) and, if given, ``key_valid [B,T]``. The sliding window
    is measured in **positions** (``pos_q - window < pos_k``), not row slots, so packed
    rows and shared-prompt rows (where slots and positions differ) get the window each
    sequence would get on its own.
    """
    m = jnp.asarray(attn_mask)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"attn_mask [B,1,T,T] expected a singleton head axis, got shape {m.shape}")
        m = m[:, 0]
    B, T = positions.shape
    if m.ndim != 3 or m.shape[-2:] != (T, T) or m.shape[0] not in (1, B):
        raise ValueError(
            f"attn_mask must be [B,T,T] or [B,1,T,T] with B={B}, T={T}; got shape {tuple(attn_mask.shape)}"
        )
    slots = jnp.arange(T)
    full = m.astype(bool) & (slots[None, :] <= slots[:, None])[None]
    if key_valid is not None:
        full = full & key_valid.astype(bool)[:, None, :]
    if window is None:
        return full, full
    pos = positions.astype(jnp.int32)
    local = full & (pos[:, None, :] > pos[:, :, None] - window)
    return full, local


def decoder_layer(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    cache_kv: tuple[jax.Array, jax.Array] | None = None,
    cache_start: jax.Array | int = 0,
    attn_impl: str | None = None,
    seq_lengths: jax.Array | None = None,
    window: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block on ``h [B,T,D]`` (compute dtype = ``h.dtype``).

    With ``cache_kv = (k [B,S,K,Hd], v)``, the new keys/values are written at slot
    ``cache_start`` and attention runs over the whole cache; the updated cache is returned.
    """
    dt = h.dtype
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    w = lambda name: p[name].astype(dt)  # noqa: E731
    B, T, D = h.shape
    # projections as 2-D [B*T, D] matmuls: the weight gradients are then plain [D, B*T] @ [B*T, F]
    # products (XLA:CPU runs a dot that contracts both b and t about 2x slower)
    x = rms_norm(h, p["attn_norm"], eps, off).reshape(B * T, D)
    proj = lambda name: (x @ w(name).reshape(D, -1)).reshape((B, T) + p[name].shape[1:])  # noqa: E731
    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    if cfg.qkv_bias:
        q, k, v = q + w("q_bias"), k + w("k_bias"), v + w("v_bias")
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], eps, off)
        k = rms_norm(k, p["k_norm"], eps, off)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_start, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_start, axis=1)
        new_cache = (ck, cv)
        k, v = ck.astype(dt), cv.astype(dt)
    a = attention(q, k, v, mask, cfg.attn_scale, cfg.attn_logit_softcapping, attn_impl, seq_lengths, window,
                  causal_blocks=cache_kv is None)
    o = (a.reshape(B * T, -1) @ w("o_proj").reshape(-1, D)).reshape(B, T, D)
    if cfg.o_bias:
        o = o + w("o_bias")
    if cfg.sandwich_norms:
        o = rms_norm(o, p["post_attn_norm"], eps, off)
    h = h + o
    x = rms_norm(h, p["mlp_norm"], eps, off).reshape(B * T, D)
    g = _act(cfg.hidden_act)(x @ w("gate_proj")) * (x @ w("up_proj"))
    m = (g @ w("down_proj")).reshape(B, T, D)
    if cfg.sandwich_norms:
        m = rms_norm(m, p["post_mlp_norm"], eps, off)
    return h + m, new_cache


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


def run_layers(
    cfg: ModelConfig,
    layer_params: dict[str, jax.Array],
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask_full: jax.Array,
    mask_local: jax.Array,
    cache: dict[str, jax.Array] | None = None,
    cache_start: jax.Array | int = 0,
    attn_impl: str | None = None,
    seq_lengths: jax.Array | None = None,
    window: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """All decoder layers (scanned or unrolled, optionally rematerialised).

    With ``seq_lengths`` (the cuDNN form, see :func:`attention`) every layer uses the same
    static ``window`` and the masks are unused."""
    sliding = jnp.asarray(cfg.sliding_layers, dtype=bool)

    def body(h, xs):
        p, is_local, ckv = xs
        if seq_lengths is not None:
            mask = None
        elif cfg.sliding_window is not None:
            mask = jnp.where(is_local, mask_local, mask_full)
        else:
            mask = mask_full
        h, new = decoder_layer(cfg, p, h, cos, sin, mask, ckv, cache_start, attn_impl, seq_lengths, window)
        return h, new

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    ckv = None if cache is None else (cache["k"], cache["v"])
    xs = (layer_params, sliding, ckv)
    if cfg.scan_layers:
        h, new = jax.lax.scan(body, h, xs)
    else:
        outs = []
        for i in range(cfg.num_layers):
            h, o = body(h, jax.tree.map(lambda a: a[i], xs))
            outs.append(o)
        new = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return h, (None if cache is None else {"k": new[0], "v": new[1]})


# ---------------------------------------------------------------------------- module


def _param(value, axes) -> nnx.Param:
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Layers(nnx.Module):
    """Stacked per-layer parameters (leading ``layers`` axis); attributes named as in
    :func:`layer_param_specs`."""

    def __init__(self, cfg: ModelConfig, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        for name, (axes, shape) in layer_param_specs(cfg).items():
            full = (cfg.num_layers, *shape)
            if name.endswith("_norm"):
                val = jnp.zeros(full, param_dtype) if cfg.norm_offset else jnp.ones(full, param_dtype)
            elif name.endswith("_bias"):
                val = jnp.zeros(full, param_dtype)
            else:
                val = init(rngs.params(), full, param_dtype)
            setattr(self, name, _param(val, ("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    @property
    def names(self) -> list[str]:
        return [n for n, v in vars(self).items() if isinstance(v, nnx.Param)]


ATTN_IMPLEMENTATIONS = (None, "xla", "cudnn", "xla_seqlen")


class CausalLM(nnx.Module):
    """Decoder-only causal LM. ``model(input_ids [B,T] int32, attention_mask=None,
    positions=None) -> logits [B,T,V] fp32``.

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); ``param_dtype`` the storage dtype.
    Positions default to ``cumsum(attention_mask) - 1`` so left padding works.
    ``attn_mask=[B,T,T]`` bool (keyword, with explicit ``positions``) runs packed or
    shared-prompt rows: see :meth:`hidden_states` and :func:`segment_attention_mask`.

    ``attn_implementation`` (any padding and KV caches work with ``None`` and ``"xla"``):

    * ``None`` (default): explicit masked attention (fp32 scores and softmax, Gemma-2
      soft-capping included); without a KV cache it runs by query blocks of
      :data:`ATTN_BLOCK` that skip the key blocks above the diagonal
      (:func:`blocked_causal_attention`: same result, about half the score FLOPs for long
      rows); with a cache, over the whole cache;
    * ``"xla"``: ``jax.nn.dot_product_attention`` with the full ``[B,T,S]`` boolean mask
      (the whole score matrix; soft-capped models fall back to ``None``'s explicit path);
    * ``"cudnn"``: forward passes without a cache use cuDNN flash attention (``is_causal`` +
      per-row lengths; needs a GPU, bf16/fp16 compute and **right-padded** rows, i.e. the
      trainer's batches); ``"xla_seqlen"`` is the same formulation on XLA (its CPU
      reference). Soft-capped attention (Gemma-2), layers with mixed windows (Gemma-2, some
      Qwen2), a KV cache and caller-given ``attn_mask`` take ``None``'s path instead.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        attn_implementation: str | None = None,
    ):
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
            )
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attn_implementation = attn_implementation
        init = nnx.initializers.normal(0.02)
        specs = top_param_specs(config)
        axes, shape = specs["embed"]
        self.embed = _param(init(rngs.params(), shape, param_dtype), axes)
        axes, shape = specs["final_norm"]
        norm0 = jnp.zeros if config.norm_offset else jnp.ones
        self.final_norm = _param(norm0(shape, param_dtype), axes)
        if "lm_head" in specs:
            axes, shape = specs["lm_head"]
            self.lm_head = _param(init(rngs.params(), shape, param_dtype), axes)
        self.layers = Layers(config, param_dtype, rngs)

    # -- pieces -----------------------------------------------------------------
    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """``[B,T]`` ids -> ``[B,T,D]`` embeddings in the compute dtype (Gemma: times sqrt(D))."""
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        if self.config.embed_scale:
            h = h * jnp.asarray(self.config.hidden_size**0.5, dtype=self.dtype)
        return h

    def _trunk(self, input_ids, key_valid, positions, q_slots, cache=None, cache_start=0, attn_mask=None):
        cfg = self.config
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg), self.dtype)
        impl = self.attn_implementation
        seq_lengths, window = None, None
        if attn_mask is not None:
            # caller-given block mask (packing / shared prompt): always the mask path
            impl = None if impl in ("cudnn", "xla_seqlen") else impl
            full, local = custom_masks(attn_mask, positions, key_valid, cfg.sliding_window)
        elif (
            impl in ("cudnn", "xla_seqlen")
            and cache is None
            and cfg.attn_logit_softcapping is None
            and len(set(cfg.sliding_layers)) == 1
        ):
            seq_lengths = jnp.sum(key_valid.astype(jnp.int32), axis=-1)
            window = cfg.sliding_window if cfg.sliding_layers[0] else None
            impl = "cudnn" if impl == "cudnn" else "xla"
            full = local = None
        else:
            impl = None if impl in ("cudnn", "xla_seqlen") else impl
            full, local = build_masks(key_valid, q_slots, cfg.sliding_window)
        h, cache = run_layers(
            cfg, self.layers.arrays(), h, cos, sin, full, local, cache, cache_start, impl, seq_lengths, window
        )
        h = rms_norm(h, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_offset)
        return h, cache

    def hidden_states(self, input_ids, attention_mask=None, positions=None, attn_mask=None) -> jax.Array:
        """Final-norm hidden states ``[B,T,D]`` (compute dtype).

        ``attn_mask`` (optional, ``[B,T,T]`` or ``[B,1,T,T]`` bool, True = query may attend
        key): a block mask for packed / shared-prompt rows (see
        :func:`segment_attention_mask`). It is intersected with row causality and with
        ``attention_mask`` (when given, as key validity); sliding windows are applied by
        ``positions``, which must then be given explicitly (e.g. restarting per packed
        sequence). With ``attn_mask`` the explicit-mask attention path is always used.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        B, T = input_ids.shape
        if attn_mask is not None:
            if positions is None:
                raise ValueError(
                    "hidden_states(attn_mask=...) needs explicit positions [B,T] (packed rows restart "
                    "positions per sequence; they cannot be derived from a padding mask)"
                )
            positions = jnp.asarray(positions, jnp.int32)
            if positions.shape != (B, T):
                raise ValueError(f"positions has shape {positions.shape}, expected {(B, T)}")
            h, _ = self._trunk(input_ids, attention_mask, positions, jnp.arange(T), attn_mask=attn_mask)
            return h
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        h, _ = self._trunk(input_ids, attention_mask, positions, jnp.arange(T))
        return h

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """``[..., D]`` hidden -> ``[..., V]`` fp32 logits (lm_head or tied embedding, final soft-cap)."""
        h = h.astype(self.dtype)
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("...d,vd->...v", h, self.embed[...].astype(self.dtype), preferred_element_type=F32)
        else:
            logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype), preferred_element_type=F32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits.astype(F32)

    def __call__(self, input_ids, attention_mask=None, positions=None, attn_mask=None) -> jax.Array:
        """Logits ``[B,T,V]`` fp32; arguments as in :meth:`hidden_states`."""
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask, positions, attn_mask))

    # -- KV cache -----------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
        """Zero KV cache ``{"k","v": [L,B,S,K,Hd]}`` in ``dtype`` (default: compute dtype)."""
        cfg = self.config
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dt = self.dtype if dtype is None else dtype
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}

    def forward_cached(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        key_valid: jax.Array,
        cache: dict[str, jax.Array],
        cache_start: jax.Array | int,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run ``input_ids [B,T]`` stored at cache slots ``cache_start..cache_start+T-1``.

        ``key_valid [B,S]`` marks the cache slots holding real tokens (including the new
        ones). Returns final hidden states ``[B,T,D]`` and the updated cache.
        """
        T = input_ids.shape[1]
        q_slots = cache_start + jnp.arange(T)
        return self._trunk(input_ids, key_valid, positions, q_slots, cache, cache_start)
