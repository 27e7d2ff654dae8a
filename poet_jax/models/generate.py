"""Batched autoregressive generation with a KV cache, jitted once per shape.

Prompts are left-padded ``[B,T]``. A prefill pass writes the prompt into a cache of
``T + max_new_tokens`` slots; a ``lax.while_loop`` then decodes one token per step and
stops early once every row has emitted an end token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .transformer import CausalLM, positions_from_mask


class GenerationOutput(NamedTuple):
    """``sequences [B, max_new_tokens]`` int32 (``pad_token_id`` after a row stops; the end
    token itself is kept) and ``lengths [B]`` int32 (generated tokens, end token included)."""

    sequences: jax.Array
    lengths: jax.Array


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    do_sample: bool,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    use_top_p: bool = False,
) -> jax.Array:
    """Next token ``[B]`` from fp32 ``logits [B,V]``: argmax, or sampling with temperature,
    top-k (keep the k largest) and top-p (smallest set with mass >= p, at least one token)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted = drop_sorted.at[:, 0].set(False)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "top_k", "use_top_p", "eos_token_ids", "pad_token_id"),
)
def _generate_jit(
    graphdef,
    state,
    input_ids,
    attention_mask,
    rng,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    use_top_p: bool,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
):
    model = nnx.merge(graphdef, state)
    B, T = input_ids.shape
    N = max_new_tokens
    S = T + N
    mask = attention_mask.astype(jnp.int32)
    positions = positions_from_mask(mask)
    key_valid = jnp.concatenate([mask, jnp.zeros((B, N), jnp.int32)], axis=1)
    cache = model.init_cache(B, S)
    h, cache = model.forward_cached(input_ids, positions, key_valid, cache, 0)
    logits = model.logits_from_hidden(h[:, -1])
    next_pos = positions[:, -1] + 1
    sample = functools.partial(
        sample_logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p
    )
    rng, sub = jax.random.split(rng)
    tok = sample(logits, sub)
    eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)

    def cond(c):
        i, _, done, *_ = c
        return (i < N) & ~jnp.all(done)

    def body(c):
        i, tok, done, lengths, out, cache, key_valid, rng = c
        out = out.at[:, i].set(jnp.where(done, pad_token_id, tok))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        slot = T + i
        key_valid = key_valid.at[:, slot].set(1)
        h, cache = model.forward_cached(tok[:, None], (next_pos + i)[:, None], key_valid, cache, slot)
        logits = model.logits_from_hidden(h[:, 0])
        rng, sub = jax.random.split(rng)
        return i + 1, sample(logits, sub), done, lengths, out, cache, key_valid, rng

    init = (
        jnp.int32(0),
        tok,
        jnp.zeros((B,), bool),
        jnp.zeros((B,), jnp.int32),
        jnp.full((B, N), pad_token_id, jnp.int32),
        cache,
        key_valid,
        rng,
    )
    _, _, _, lengths, out, *_ = jax.lax.while_loop(cond, body, init)
    return GenerationOutput(out, lengths)


def generate(
    model: CausalLM,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids=None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """Decode up to ``max_new_tokens`` after left-padded prompts ``input_ids [B,T]``.

    ``temperature=0`` is greedy. ``eos_token_ids`` default to ``model.config.eos_token_ids``;
    ``pad_token_id`` to the config's pad (else the first end token, else 0). ``rng`` is
    required when sampling. Compiled once per (model structure, shapes, sampling mode).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    cfg = model.config
    eos = tuple(cfg.eos_token_ids) if eos_token_ids is None else (
        (int(eos_token_ids),) if isinstance(eos_token_ids, int) else tuple(int(e) for e in eos_token_ids)
    )
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    do_sample = temperature > 0
    if do_sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng, e.g. jax.random.key(0)")
    if rng is None:
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef,
        state,
        input_ids,
        attention_mask,
        rng,
        jnp.float32(temperature if do_sample else 1.0),
        jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens),
        do_sample=do_sample,
        top_k=int(top_k) if do_sample else 0,
        use_top_p=do_sample and top_p < 1.0,
        eos_token_ids=eos,
        pad_token_id=int(pad_token_id),
    )
