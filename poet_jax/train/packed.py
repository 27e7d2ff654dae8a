"""Per-pair sequence log-probs from shared-prompt / packed rows (pure functions).

Drop-in alternatives to the two-row path of :mod:`poet_jax.train.step` for a
:class:`poet_jax.data.packing.PackedBatch` (as a dict of arrays, see
``PackedBatch.as_dict``)::

    input_ids, positions, segment_ids, branch_ids,
    chosen_targets, chosen_mask, rejected_targets, rejected_mask, pair_slot   int32 [R, L]
    pair_valid                                                                int32 [R, M]

One forward pass over ``[R, L]`` with the block mask
``segment_attention_mask(segment_ids, branch_ids)`` and explicit ``positions``; the
logits at every slot are computed once and scored against both the chosen and the
rejected targets (``poet_jax.losses.token_logps``); per-pair sums come back as
``[N] = [R * M]`` (row-major pair slots) through ``jax.ops.segment_sum`` with a fixed
``num_segments``. Empty slots give 0 and ``pair_valid = 0``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax.models.transformer import segment_attention_mask

F32 = jnp.float32

__all__ = [
    "packed_hidden_states",
    "packed_token_logps",
    "packed_sequence_stats",
    "packed_sequence_logps",
    "packed_reference_logps",
    "packed_pair_valid",
]


def packed_hidden_states(model, batch: dict) -> jax.Array:
    """Final hidden states ``[R, L, D]`` of packed rows (block mask + explicit positions)."""
    mask = segment_attention_mask(batch["segment_ids"], batch["branch_ids"])
    return model.hidden_states(batch["input_ids"], positions=batch["positions"], attn_mask=mask)


def _scores(logits: jax.Array, ct: jax.Array, rt: jax.Array):
    """Chosen / rejected token log-probs and the vocabulary-mean logit of a ``[R, c, V]`` block.

    ``losses.token_logps`` for both target arrays with one fp32 log-normaliser per slot (the
    slot before a shared-prompt pair's responses predicts both first tokens; every other slot
    has at most one scored target): a single softmax pass over the vocabulary, not two.
    """
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits.astype(F32), axis=-1)

    def pick(targets):
        valid = (targets >= 0) & (targets < vocab)
        safe = jnp.where(valid, targets, 0)
        tl = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0].astype(F32)
        return jnp.where(valid, tl - lse, 0.0)

    return pick(ct), pick(rt), jnp.mean(logits.astype(F32), axis=-1)


def packed_token_logps(model, batch: dict, chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(chosen_tlp, rejected_tlp, mean_logit)``, each ``[R, L]`` float32, aligned with logits slots.

    ``chosen_tlp[r, t] = log p(chosen_targets[r, t] | row prefix visible at t)`` (0 where the
    target is ``-1``); same for rejected. ``chunk > 0`` projects ``chunk`` slots at a time
    (at most ``[R, chunk, V]`` logits live, forward and backward); 0 = all at once.
    """
    hidden = packed_hidden_states(model, batch)
    ct = jnp.asarray(batch["chosen_targets"], jnp.int32)
    rt = jnp.asarray(batch["rejected_targets"], jnp.int32)
    rows, seq, dim = hidden.shape
    project = model.logits_from_hidden
    if not chunk or chunk >= seq:
        return _scores(project(hidden), ct, rt)
    n = -(-seq // chunk)
    pad = n * chunk - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        ct = jnp.pad(ct, ((0, 0), (0, pad)), constant_values=-1)
        rt = jnp.pad(rt, ((0, 0), (0, pad)), constant_values=-1)
    split = lambda x: jnp.moveaxis(x.reshape(rows, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(args):
        hc, cc, rc = args
        return _scores(project(hc), cc, rc)

    outs = jax.lax.map(one, (split(hidden), split(ct), split(rt)))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(rows, n * chunk)[:, :seq] for o in outs)


def _pair_ids(batch: dict) -> tuple[jax.Array, int]:
    """Flat pair index ``r * M + pair_slot`` per slot (``N`` = dropped for padding) and ``N``."""
    slot = jnp.asarray(batch["pair_slot"], jnp.int32)
    rows = slot.shape[0]
    m = batch["pair_valid"].shape[1]
    n = rows * m
    flat = jnp.arange(rows, dtype=jnp.int32)[:, None] * m + slot
    return jnp.where(slot >= 0, flat, n), n


def _pair_sum(values: jax.Array, mask: jax.Array, ids: jax.Array, n: int) -> jax.Array:
    v = jnp.where(jnp.asarray(mask).astype(bool), values.astype(F32), 0.0)
    return jax.ops.segment_sum(v.reshape(-1), ids.reshape(-1), num_segments=n)


def packed_pair_valid(batch: dict) -> jax.Array:
    """``pair_valid`` flattened to ``[N]`` (the order of every per-pair output here)."""
    return jnp.asarray(batch["pair_valid"]).reshape(-1)


def packed_sequence_stats(model, batch: dict, chunk: int = 0) -> dict[str, jax.Array]:
    """Per-pair statistics in the row layout of ``step.sequence_stats``: ``[2N]`` = chosen then rejected.

    Returns float32 ``logps`` (summed response log-probs), ``n_tokens`` (scored tokens)
    and ``logit_sum`` (sum over scored slots of the vocabulary-mean logit, gradient
    stopped), each ``[2N]`` with ``N = R * M``; plus ``pair_valid`` ``[N]``. So
    ``step.pair_losses(cfg, stats, ref_logps)`` works unchanged with ``valid = pair_valid``.
    """
    tc, tr, mean_logit = packed_token_logps(model, batch, chunk)
    ids, n = _pair_ids(batch)
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    ml = jax.lax.stop_gradient(mean_logit)
    ones = jnp.ones(ids.shape, F32)
    return {
        "logps": jnp.concatenate([_pair_sum(tc, cm, ids, n), _pair_sum(tr, rm, ids, n)]),
        "n_tokens": jnp.concatenate([_pair_sum(ones, cm, ids, n), _pair_sum(ones, rm, ids, n)]),
        "logit_sum": jnp.concatenate([_pair_sum(ml, cm, ids, n), _pair_sum(ml, rm, ids, n)]),
        "pair_valid": packed_pair_valid(batch),
    }


def packed_sequence_logps(
    model, batch: dict, chunk: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[N]`` float32.

    Summed log-probs over each pair's scored (response, POET-cut) tokens and the token
    counts, ``N = R * M`` pair slots in row-major order (``batch["pair_valid"].reshape(-1)``
    marks real pairs). Differentiable with respect to the model's parameters.
    """
    s = packed_sequence_stats(model, batch, chunk)
    n = s["pair_valid"].shape[0]
    return s["logps"][:n], s["logps"][n:], s["n_tokens"][:n], s["n_tokens"][n:]


def packed_reference_logps(graphdef, params: Any, rest: Any, batch: dict, chunk: int = 0) -> jax.Array:
    """Reference log-probs ``[2N]`` (chosen then rejected, gradient stopped) of packed rows.

    The packed counterpart of ``step.row_logps``: for a frozen reference inside the step,
    or the precompute pass (map pair slot ``j`` back to ``example_index.reshape(-1)[j]``).
    ``rest``: the non-``Param`` state from ``nnx.split(model, nnx.Param, ...)``, or None when
    ``params`` is the model's whole state.
    """
    model = nnx.merge(graphdef, params) if rest is None else nnx.merge(graphdef, params, rest)
    return jax.lax.stop_gradient(packed_sequence_stats(model, batch, chunk)["logps"])
