"""Pure-functional preference losses with POET (Prefix-Oriented Equal-length Training).

Everything here is a pure function of arrays; the module imports only ``jax``,
``jax.numpy``, ``numpy``, ``math``, ``typing``, ``dataclasses`` and ``functools`` so it
can be copied into any JAX code base.

Pipeline (B pairs, ``R = 2B`` rows when chosen and rejected share a batch)::

    logits [R, T, V] --token_logps--> [R, T] --(poet_mask)--> sequence_logps --> [R]
        --> dpo_loss / simpo_loss / cpo_loss / orpo_loss --> (per_pair_loss [B], metrics)
        --> reduce_pairs(..., pair_weights) --> (sum, count)

Conventions
-----------
* Log-probabilities are always accumulated in float32 (or wider when the input is
  float64), whatever the dtype of the logits.
* Every loss takes per-pair *summed* log-probs ``[B]``. Losses that need per-token
  averages (``ipo``, ``sigmoid_norm``, SimPO, ``cpo`` with ``ipo``/``simpo``, ORPO) take
  the token counts as ``chosen_lengths`` / ``rejected_lengths`` (clamped to >= 1, as
  TRL does). With POET the counts are the kept counts (``k`` for both responses).
* Every loss returns ``(per_pair_loss [B], metrics)`` where ``metrics`` maps TRL's
  metric names to ``[B]`` arrays. Reduce them with :func:`reduce_pairs`.
* POET is a mask: cut the response masks with :func:`poet_mask` before
  :func:`sequence_logps`, so every loss works with POET unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "token_logps",
    "token_logps_from_hidden",
    "sequence_logps",
    "poet_keep_lengths",
    "poet_mask",
    "poet_metrics",
    "check_masks",
    "response_lengths",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "DPO_LOSS_TYPES",
    "LOSSES",
    "LossSpec",
    "compute_preference_loss",
    "needs_reference",
    "reduce_pairs",
    "safe_mean",
    "prefix_margins",
    "prefix_margins_at",
    "prefix_margins_at_fractions",
    "POET_RULES",
]

Array = Any  # jax.Array | np.ndarray

# --------------------------------------------------------------------------------------
# Token log-probabilities
# --------------------------------------------------------------------------------------


def _acc_dtype(dtype) -> Any:
    """float32 for <=32-bit floats, float64 for float64 inputs (x64 mode)."""
    return jnp.promote_types(dtype, jnp.float32)


def _token_logps_plain(logits: Array, targets: Array) -> Array:
    return _chunk_stats(logits, targets)[0]


def token_logps(logits: Array, targets: Array, *, chunk_size: int | None = None) -> Array:
    """Per-token log-probabilities ``log softmax(logits)[..., targets]``.

    Args:
      logits: ``[R, T, V]`` float (any float dtype; bf16 is fine).
      targets: ``[R, T]`` int token ids. Ids outside ``[0, V)`` (e.g. ``-100``) give 0.
      chunk_size: ``None`` computes the log-softmax in one go. An int processes the
        sequence axis in chunks of ``chunk_size`` positions (``lax.map``) with a custom
        VJP that saves only the ``[R, T]`` fp32 log-normalisers, so only an fp32
        ``[R, chunk_size, V]`` block exists at any time, in the forward and in the
        backward pass (whose ``[R, T, V]`` gradient is written in the logits' dtype).
        ``T`` need not be a multiple of ``chunk_size``. Values and gradients equal the
        plain mode (reverse mode only: the custom VJP does not support ``jax.jvp``).

    Returns:
      ``[R, T]`` float32 (float64 for float64 logits) log-probabilities.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logps expects logits [R, T, V] and targets [R, T]; got logits {logits.shape} "
            f"and targets {targets.shape}"
        )
    if chunk_size is None:
        return _token_logps_plain(logits, targets)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return _token_logps_chunked(logits, targets, chunk_size)


def _chunk_stats(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``(log p(target), logsumexp)`` of a ``[R, c, V]`` block, in the accumulation dtype.

    The target logit is gathered in the input dtype (exact) and the normaliser is
    accumulated in fp32; targets outside ``[0, V)`` give 0.
    """
    vocab = logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    valid = (targets >= 0) & (targets < vocab)
    safe = jnp.where(valid, targets, 0).astype(jnp.int32)
    lse = jax.nn.logsumexp(logits.astype(acc), axis=-1)
    tl = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0].astype(acc)
    return jnp.where(valid, tl - lse, jnp.zeros((), acc)), lse


def _chunk_grad(logits: Array, targets: Array, lse: Array, g: Array) -> Array:
    """``g * (onehot(target) - softmax)`` for one block, returned in the logits dtype."""
    vocab = logits.shape[-1]
    valid = (targets >= 0) & (targets < vocab)
    probs = jnp.exp(logits.astype(lse.dtype) - lse[..., None])
    onehot = jnp.arange(vocab, dtype=jnp.int32) == targets[..., None]
    gv = jnp.where(valid, g, jnp.zeros((), g.dtype)).astype(lse.dtype)[..., None]
    return (gv * (onehot.astype(lse.dtype) - probs)).astype(logits.dtype)


def _map_chunks(fn, chunk_size: int, seq: int, *arrays):
    """Apply ``fn`` to consecutive sequence chunks (axis 1) of ``arrays`` and concatenate.

    Full chunks go through ``lax.map`` over ``dynamic_slice`` (one block alive at a time);
    the remainder (``seq % chunk_size`` positions) is one extra static call.
    """
    n_full = seq // chunk_size
    outs = []
    if n_full:
        def body(i):
            return fn(*(jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1) for x in arrays))

        stacked = jax.lax.map(body, jnp.arange(n_full))
        outs.append(jax.tree.map(
            lambda y: jnp.moveaxis(y, 0, 1).reshape((y.shape[1], n_full * chunk_size) + y.shape[3:]), stacked))
    if seq - n_full * chunk_size:
        outs.append(fn(*(x[:, n_full * chunk_size:] for x in arrays)))
    if len(outs) == 1:
        return outs[0]
    return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_logps_chunked(logits, targets, chunk_size):
    return _map_chunks(_chunk_stats, chunk_size, logits.shape[1], logits, targets)[0]


def _token_logps_chunked_fwd(logits, targets, chunk_size):
    lp, lse = _map_chunks(_chunk_stats, chunk_size, logits.shape[1], logits, targets)
    return lp, (logits, targets, lse)


def _token_logps_chunked_bwd(chunk_size, res, g):
    logits, targets, lse = res
    grad = _map_chunks(_chunk_grad, chunk_size, logits.shape[1], logits, targets, lse, g)
    return grad, None


_token_logps_chunked.defvjp(_token_logps_chunked_fwd, _token_logps_chunked_bwd)


def token_logps_from_hidden(
    hidden: Array,
    targets: Array,
    project_fn: Callable[[Array], Array],
    *,
    chunk_size: int,
) -> Array:
    """Per-token log-probs from final hidden states without building full logits.

    The sequence axis is cut into chunks of ``chunk_size`` positions (padded internally
    when ``T`` is not a multiple); each chunk goes through ``project_fn`` (e.g. the
    model's unembedding plus logit soft-capping) and :func:`token_logps` inside
    ``jax.checkpoint`` under ``lax.map``, so neither the forward nor the backward pass
    holds more than ``[R, chunk_size, V]`` logits.

    Args:
      hidden: ``[R, T, D]`` final hidden states.
      targets: ``[R, T]`` int token ids (outside ``[0, V)`` gives 0).
      project_fn: ``h [R, c, D] -> logits [R, c, V]``; may close over parameters
        (gradients flow to them).
      chunk_size: positions per chunk (positive int).

    Returns:
      ``[R, T]`` float32 log-probabilities (same values and gradients as
      ``token_logps(project_fn(hidden), targets)``).
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"token_logps_from_hidden expects hidden [R, T, D] and targets [R, T]; got hidden "
            f"{hidden.shape} and targets {targets.shape}"
        )
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    rows, seq, dim = hidden.shape
    n = -(-seq // chunk_size)
    pad = n * chunk_size - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h = jnp.moveaxis(hidden.reshape(rows, n, chunk_size, dim), 1, 0)  # [n, R, c, D]
    t = jnp.moveaxis(targets.reshape(rows, n, chunk_size), 1, 0)  # [n, R, c]

    @jax.checkpoint
    def one_chunk(args):
        hc, tc = args
        return _token_logps_plain(project_fn(hc), tc)

    out = jax.lax.map(one_chunk, (h, t))  # [n, R, c]
    return jnp.moveaxis(out, 0, 1).reshape(rows, n * chunk_size)[:, :seq]


def sequence_logps(token_logps: Array, mask: Array, average: bool = False) -> Array:
    """Sum (or mean) of per-token log-probs over the masked positions.

    Args:
      token_logps: ``[R, T]`` float.
      mask: ``[R, T]`` bool/int, nonzero on scored (response) tokens.
      average: divide by the number of masked tokens. A row with no masked token gives
        0 (never NaN) in both modes.

    Returns:
      ``[R]`` float32 (or wider). Masked-out positions are excluded with ``where``, so
      even ``-inf``/NaN there does not leak into the value.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"sequence_logps: token_logps {token_logps.shape} and mask {mask.shape} differ")
    acc = _acc_dtype(token_logps.dtype)
    m = mask.astype(bool)
    total = jnp.sum(jnp.where(m, token_logps.astype(acc), jnp.zeros((), acc)), axis=-1)
    if not average:
        return total
    count = jnp.sum(m, axis=-1).astype(acc)
    return total / jnp.maximum(count, 1)


# --------------------------------------------------------------------------------------
# POET masks
# --------------------------------------------------------------------------------------

POET_RULES = ("min", "own", "none")


@functools.lru_cache(maxsize=256)
def _ratio_as_fraction(ratio: float) -> tuple[int, int]:
    """``ratio`` as ``p / q`` with the smallest ``q <= 1000`` (exact integer ceil later)."""
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"POET ratio must be in (0, 1], got {ratio}")
    for q in range(1, 1001):
        p = round(ratio * q)
        if abs(p - ratio * q) <= 1e-9 * q:
            return int(p), q
    raise ValueError(
        f"POET ratio {ratio} is not a fraction with denominator <= 1000; use e.g. 0.25, 0.5, 0.75, 1/3"
    )


def _is_jax(*xs) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


def poet_keep_lengths(n_chosen, n_rejected, rule: str = "min", ratio: float = 1.0):
    """How many response tokens each side keeps (the one POET rule, for masks and id lists).

    Rules (``ratio`` in ``(0, 1]``; ``ceil`` is computed exactly in integers, ``ratio``
    being read as a fraction ``p/q`` with ``q <= 1000``):

    * ``"min"`` (POET): ``k = min(n_c, n_r)``; both keep ``max(1, ceil(ratio * k))``.
      ``ratio=1`` is the paper's POET; ``ratio<1`` is its "fraction of k" ablation.
    * ``"own"``: each keeps ``max(1, ceil(ratio * n_own))`` (the "fraction of each
      response's own length" ablation; ``ratio=1`` keeps everything).
    * ``"none"``: keep everything (``ratio`` must be 1).

    A response with 0 tokens keeps 0, and under ``"min"`` an empty side makes both keep
    0 (use :func:`check_masks` to reject such pairs before training). Keep lengths
    never exceed the response lengths. ``rule`` and ``ratio`` are static Python values.

    Args:
      n_chosen, n_rejected: ints, numpy int arrays or jax int arrays (broadcastable).

    Returns:
      ``(keep_chosen, keep_rejected)``: jax arrays if any input is a jax array, numpy
      otherwise (Python ints in, Python ints out).
    """
    if rule not in POET_RULES:
        raise ValueError(f"unknown POET rule {rule!r}; valid rules: {', '.join(POET_RULES)}")
    p, q = _ratio_as_fraction(ratio)
    if rule == "none" and p != q:
        raise ValueError(f"POET rule 'none' keeps everything; ratio must be 1.0, got {ratio}")
    scalar_in = isinstance(n_chosen, (int, np.integer)) and isinstance(n_rejected, (int, np.integer))
    xp = jnp if _is_jax(n_chosen, n_rejected) else np
    nc = xp.asarray(n_chosen)
    nr = xp.asarray(n_rejected)
    if not (xp.issubdtype(nc.dtype, xp.integer) and xp.issubdtype(nr.dtype, xp.integer)):
        raise ValueError(f"poet_keep_lengths expects integer lengths, got {nc.dtype} and {nr.dtype}")

    def frac_ceil(n):
        kept = (n * p + (q - 1)) // q
        return xp.where(n > 0, xp.maximum(kept, 1), 0)

    if rule == "min":
        k = frac_ceil(xp.minimum(nc, nr))
        kc, kr = k, k
    elif rule == "own":
        kc, kr = frac_ceil(nc), frac_ceil(nr)
    else:
        kc, kr = nc, nr
    kc = xp.broadcast_to(kc, xp.broadcast_shapes(nc.shape, nr.shape))
    kr = xp.broadcast_to(kr, kc.shape)
    if scalar_in:
        return int(kc), int(kr)
    return kc, kr


def response_lengths(mask: Array) -> Array:
    """``[R, T]`` mask -> ``[R]`` int32 number of response tokens per row."""
    xp = jnp if _is_jax(mask) else np
    return xp.sum(xp.asarray(mask).astype(bool), axis=-1).astype(xp.int32)


def _cut_mask(mask: Array, keep: Array) -> Array:
    xp = jnp if _is_jax(mask, keep) else np
    m = xp.asarray(mask)
    on = m.astype(bool)
    pos = xp.cumsum(on.astype(xp.int32), axis=-1)  # 1-based index among the row's response tokens
    kept = on & (pos <= xp.asarray(keep)[..., None])
    return kept.astype(m.dtype)


def poet_mask(chosen_mask: Array, rejected_mask: Array, *, rule: str = "min", ratio: float = 1.0):
    """Cut each pair's two response masks to the POET keep lengths.

    Tokens are counted from each response's own first masked token, so the result is
    right whatever the padding side and whatever the prompt lengths (chosen and
    rejected rows may even have different ``T``). With ``rule="min", ratio=1`` both
    keep their first ``k = min(n_c, n_r)`` tokens: the shorter response is unchanged
    (it keeps its EOS), equal-length pairs are unchanged.

    Args:
      chosen_mask: ``[B, Tc]`` bool/int response mask of the chosen rows.
      rejected_mask: ``[B, Tr]`` bool/int response mask of the rejected rows.
      rule, ratio: see :func:`poet_keep_lengths`.

    Returns:
      ``(chosen_mask_kept, rejected_mask_kept)``, same shapes and dtypes as the inputs
      (jax arrays if either input is a jax array).
    """
    if chosen_mask.ndim != 2 or rejected_mask.ndim != 2 or chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(
            f"poet_mask expects [B, Tc] and [B, Tr] masks with the same B; got {chosen_mask.shape} "
            f"and {rejected_mask.shape}"
        )
    if _is_jax(chosen_mask, rejected_mask):
        chosen_mask, rejected_mask = jnp.asarray(chosen_mask), jnp.asarray(rejected_mask)
    kc, kr = poet_keep_lengths(response_lengths(chosen_mask), response_lengths(rejected_mask), rule, ratio)
    return _cut_mask(chosen_mask, kc), _cut_mask(rejected_mask, kr)


def poet_metrics(chosen_mask, rejected_mask, chosen_kept, rejected_kept) -> dict[str, Array]:
    """POET diagnostics per pair (``[B]`` float32 each; reduce with :func:`reduce_pairs`).

    * ``poet/k``: ``min(kept_c, kept_r)`` (POET's k under the default rule).
    * ``poet/kept_fraction``: ``(kept_c + kept_r) / (n_c + n_r)`` for this pair (1 when
      the pair is empty).
    * ``poet/kept_tokens``, ``poet/response_tokens``: the two counts, so a token-weighted
      fraction is ``sum(kept_tokens) / sum(response_tokens)``.
    """
    nc, nr = response_lengths(chosen_mask), response_lengths(rejected_mask)
    kc, kr = response_lengths(chosen_kept), response_lengths(rejected_kept)
    xp = jnp if _is_jax(nc, kc) else np
    total = (nc + nr).astype(xp.float32)
    kept = (kc + kr).astype(xp.float32)
    return {
        "poet/k": xp.minimum(kc, kr).astype(xp.float32),
        "poet/kept_fraction": xp.where(total > 0, kept / xp.maximum(total, 1), 1.0).astype(xp.float32),
        "poet/kept_tokens": kept,
        "poet/response_tokens": total,
    }


def check_masks(chosen_mask, rejected_mask, pair_valid=None) -> None:
    """Raise ``ValueError`` if a (valid) pair has an empty chosen or rejected response.

    For concrete arrays (the data pipeline / trainer call it before jit). ``pair_valid``
    ``[B]`` (optional) marks real pairs; filler pairs may be empty.
    """
    c = np.asarray(chosen_mask)
    r = np.asarray(rejected_mask)
    if c.ndim != 2 or r.ndim != 2 or c.shape[0] != r.shape[0]:
        raise ValueError(f"check_masks expects [B, Tc] and [B, Tr] masks; got {c.shape} and {r.shape}")
    valid = np.ones(c.shape[0], bool) if pair_valid is None else np.asarray(pair_valid).astype(bool)
    if valid.shape != (c.shape[0],):
        raise ValueError(f"pair_valid must have shape ({c.shape[0]},), got {valid.shape}")
    for name, m in (("chosen", c), ("rejected", r)):
        empty = np.nonzero(valid & (m.astype(bool).sum(-1) == 0))[0]
        if empty.size:
            raise ValueError(
                f"empty {name} response (no response token in the mask) in pair(s) {empty.tolist()}; "
                "drop these pairs or mark them invalid in pair_valid"
            )


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
_USES_LABEL_SMOOTHING = {"sigmoid", "exo_pair", "robust", "aot", "aot_unpaired"}
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}


def _f(x, acc=None) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x.astype(acc or _acc_dtype(x.dtype))


def _per_token(x: Array, lengths, name: str, loss: str) -> Array:
    if lengths is None:
        raise ValueError(f"loss {loss!r} averages per token: pass {name} (token counts per pair)")
    n = jnp.asarray(lengths).astype(x.dtype)
    return x / jnp.maximum(n, 1)


def _smoothed_sigmoid(z: Array, label_smoothing: float) -> Array:
    """``-(1-ls) log sigma(z) - ls log sigma(-z)`` (cDPO / conservative loss)."""
    out = -jax.nn.log_sigmoid(z)
    if label_smoothing:
        out = out * (1.0 - label_smoothing) - jax.nn.log_sigmoid(-z) * label_smoothing
    return out


def _check_beta(beta) -> None:
    # beta may be a traced array (e.g. a scheduled value); only Python numbers are checked
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, Array]:
    cr = jax.lax.stop_gradient(chosen_rewards)
    rr = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": cr,
        "rewards/rejected": rr,
        "rewards/accuracies": (cr > rr).astype(cr.dtype),
        "rewards/margins": cr - rr,
        "logps/chosen": jax.lax.stop_gradient(chosen_logps),
        "logps/rejected": jax.lax.stop_gradient(rejected_logps),
    }


def _sort_valid(x: Array, valid: Array | None):
    """Ascending sort of ``x``; invalid entries go last. Returns (sorted, permutation)."""
    key = x if valid is None else jnp.where(valid, x, jnp.inf)
    perm = jnp.argsort(key, stable=True)
    return x[perm], perm


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    bco_reward_mean: Array | float = 0.0,
    discopop_tau: float = 0.05,
    pair_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Reference-based DAA losses (TRL ``DPOTrainer`` loss types), per pair.

    With ``h_w = pi_c - ref_c``, ``h_l = pi_r - ref_r``, ``d = h_w - h_l`` (all ``[B]``):

    * ``sigmoid``: ``-(1-ls) log s(beta d) - ls log s(-beta d)`` (cDPO; ``ls=0`` is DPO and
      TRL 1.16's ``sigmoid``, which no longer applies ``label_smoothing``).
    * ``hinge``: ``relu(1 - beta d)``.
    * ``ipo``: ``(h_w/n_w - h_l/n_l - 1/(2 beta))^2`` with token counts ``n`` (needs lengths).
    * ``exo_pair``: ``q_w (log q_w - log(1-ls)) + q_l (log q_l - log ls)``, ``q_w = s(beta d)``,
      ``q_l = s(-beta d)``; needs ``0 < ls < 1``.
    * ``nca_pair``: ``-log s(beta h_w) - 0.5 log s(-beta h_w) - 0.5 log s(-beta h_l)``.
    * ``robust``: ``(-(1-ls) log s(beta d) + ls log s(-beta d)) / (1 - 2 ls)``, ``ls < 0.5``.
    * ``bco_pair``: ``-log s(beta h_w - delta) - log s(-(beta h_l - delta))`` where
      ``delta = bco_reward_mean`` is an explicit input (default 0, as in TRL 1.16; older
      TRL used a running mean of the rewards: keep it in the trainer and pass it here).
    * ``sppo_hard``: ``(h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2``.
    * ``aot``: sort ``pi_c - pi_r`` and ``ref_c - ref_r`` over the batch, then the smoothed
      sigmoid of ``beta (sorted - sorted_ref)``; ``aot_unpaired`` sorts ``h_w`` and ``h_l``.
      These couple pairs: pass ``pair_mask`` so padding pairs are sorted last and get
      the leftover slots; loss element ``j`` of the sorted batch is placed at the pair
      holding the ``j``-th smallest first key, so valid slots line up with valid pairs.
    * ``apo_zero``: ``1 - s(beta h_w) + s(beta h_l)``; ``apo_down``: ``s(beta h_w) + 1 - s(beta d)``.
    * ``discopop``: ``z = beta d``, ``m = s(z/tau)``: ``-log s(z) (1-m) + exp(-z) m``.
    * ``sigmoid_norm``: ``-log s(beta (h_w/n_w - h_l/n_l))`` (needs lengths).

    Args:
      policy_chosen_logps ... ref_rejected_logps: ``[B]`` summed log-probs.
      beta: inverse temperature. loss_type: one of :data:`DPO_LOSS_TYPES`.
      label_smoothing: used by sigmoid, exo_pair, robust, aot, aot_unpaired (a nonzero
        value with another loss type is an error).
      chosen_lengths, rejected_lengths: ``[B]`` token counts (``ipo``, ``sigmoid_norm``).
      bco_reward_mean: ``delta`` of ``bco_pair`` (scalar or ``[B]``); treated as constant.
      discopop_tau: temperature of ``discopop``.
      pair_mask: ``[B]`` bool of real pairs; only used by ``aot``/``aot_unpaired``.

    Returns:
      ``(loss [B], metrics)``: metrics hold TRL's ``rewards/chosen`` (``beta h_w``),
      ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
      ``logps/rejected`` (the summed policy log-probs), each ``[B]``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    ls = float(label_smoothing)
    if ls and loss_type not in _USES_LABEL_SMOOTHING:
        raise ValueError(
            f"label_smoothing={ls} is not used by loss_type {loss_type!r} "
            f"(only {', '.join(sorted(_USES_LABEL_SMOOTHING))}); set it to 0"
        )
    if not 0.0 <= ls < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {ls}")
    if loss_type == "robust" and not ls < 0.5:
        raise ValueError(f"'robust' needs label_smoothing in [0, 0.5), got {ls}")
    if loss_type == "exo_pair" and ls <= 0.0:
        raise ValueError("'exo_pair' needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
    _check_beta(beta)
    pc, pr, rc, rr = (jnp.asarray(x) for x in (policy_chosen_logps, policy_rejected_logps,
                                                ref_chosen_logps, ref_rejected_logps))
    acc = _acc_dtype(jnp.result_type(pc, pr, rc, rr, jnp.float32))
    pc, pr, rc, rr = (_f(x, acc) for x in (pc, pr, rc, rr))
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or pc.ndim != 1:
        raise ValueError(f"dpo_loss expects four [B] arrays; got {pc.shape}, {pr.shape}, {rc.shape}, {rr.shape}")
    h_w = pc - rc
    h_l = pr - rr
    d = h_w - h_l
    half_inv_beta = 0.5 / beta

    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * d, ls)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1.0 - beta * d)
    elif loss_type == "ipo":
        dd = _per_token(h_w, chosen_lengths, "chosen_lengths", loss_type) - _per_token(
            h_l, rejected_lengths, "rejected_lengths", loss_type
        )
        loss = (dd - half_inv_beta) ** 2
    elif loss_type == "exo_pair":
        z = beta * d
        loss = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-ls)) + jax.nn.sigmoid(-z) * (
            jax.nn.log_sigmoid(-z) - math.log(ls)
        )
    elif loss_type == "nca_pair":
        loss = (
            -jax.nn.log_sigmoid(beta * h_w)
            - 0.5 * jax.nn.log_sigmoid(-beta * h_w)
            - 0.5 * jax.nn.log_sigmoid(-beta * h_l)
        )
    elif loss_type == "robust":
        z = beta * d
        loss = (-(1.0 - ls) * jax.nn.log_sigmoid(z) + ls * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * ls)
    elif loss_type == "bco_pair":
        delta = jax.lax.stop_gradient(_f(bco_reward_mean, acc))
        loss = -jax.nn.log_sigmoid(beta * h_w - delta) - jax.nn.log_sigmoid(-(beta * h_l - delta))
    elif loss_type == "sppo_hard":
        loss = (h_w - half_inv_beta) ** 2 + (h_l + half_inv_beta) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        valid = None if pair_mask is None else jnp.asarray(pair_mask).astype(bool)
        if loss_type == "aot":
            a, perm = _sort_valid(pc - pr, valid)
            b, _ = _sort_valid(rc - rr, valid)
        else:
            a, perm = _sort_valid(h_w, valid)
            b, _ = _sort_valid(h_l, valid)
        sorted_loss = _smoothed_sigmoid(beta * (a - b), ls)
        loss = jnp.zeros_like(sorted_loss).at[perm].set(sorted_loss)
    elif loss_type == "apo_zero":
        loss = (1.0 - jax.nn.sigmoid(beta * h_w)) + jax.nn.sigmoid(beta * h_l)
    elif loss_type == "apo_down":
        loss = jax.nn.sigmoid(beta * h_w) + (1.0 - jax.nn.sigmoid(beta * d))
    elif loss_type == "discopop":
        z = beta * d
        mod = jax.nn.sigmoid(z / discopop_tau)
        loss = -jax.nn.log_sigmoid(z) * (1.0 - mod) + jnp.exp(-z) * mod
    else:  # sigmoid_norm
        dd = _per_token(h_w, chosen_lengths, "chosen_lengths", loss_type) - _per_token(
            h_l, rejected_lengths, "rejected_lengths", loss_type
        )
        loss = -jax.nn.log_sigmoid(beta * dd)
    return loss, _reward_metrics(beta * h_w, beta * h_l, pc, pr)


SIMPO_LOSS_TYPES = ("sigmoid", "hinge")


def simpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """SimPO (reference-free, length-normalised), per pair.

    ``z = beta * (pi_c/n_c - pi_r/n_r - gamma_beta_ratio)`` (so ``gamma = beta *
    gamma_beta_ratio``); ``sigmoid``: ``-(1-ls) log s(z) - ls log s(-z)``; ``hinge``:
    ``relu(1 - z)``. With POET both counts are ``k``, giving
    ``-log s(beta/k (sum_w - sum_l) - gamma)``.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
      chosen_lengths, rejected_lengths: ``[B]`` token counts (clamped to >= 1).

    Returns:
      ``(loss [B], metrics)``; ``rewards/*`` are ``beta`` times the average log-probs
      and ``logps/*`` the average log-probs (as SimPO / TRL's CPO with ``simpo`` log).
    """
    if loss_type not in SIMPO_LOSS_TYPES:
        raise ValueError(f"unknown SimPO loss_type {loss_type!r}; valid: {', '.join(SIMPO_LOSS_TYPES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing is only used by SimPO's 'sigmoid' loss; set it to 0")
    _check_beta(beta)
    pc, pr = jnp.asarray(policy_chosen_logps), jnp.asarray(policy_rejected_logps)
    acc = _acc_dtype(jnp.result_type(pc, pr, jnp.float32))
    pc, pr = _f(pc, acc), _f(pr, acc)
    avg_c = _per_token(pc, chosen_lengths, "chosen_lengths", "simpo")
    avg_r = _per_token(pr, rejected_lengths, "rejected_lengths", "simpo")
    z = beta * (avg_c - avg_r - gamma_beta_ratio)
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(z, float(label_smoothing))
    else:
        loss = jax.nn.relu(1.0 - z)
    return loss, _reward_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_nll: Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """CPO (reference-free), per pair: ``pref_loss + cpo_alpha * chosen_nll``.

    ``x = pi_c - pi_r`` (per-token averages for ``ipo`` and ``simpo``, as TRL computes
    them: pass the token counts); with AlphaPO (``alpha != 0``) each log-prob ``l`` is
    replaced by ``(1 - exp(-alpha l)) / alpha`` first. ``sigmoid``:
    ``-(1-ls) log s(beta x) - ls log s(-beta x)``; ``simpo``: the same with
    ``x - simpo_gamma/beta``; ``hinge``: ``relu(1 - beta x)``; ``ipo``: ``(x - 1/(2 beta))^2``.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
      chosen_nll: ``[B]`` NLL of the chosen response per pair (mean token cross-entropy,
        e.g. ``-sequence_logps(lp, mask, average=True)``); required when ``cpo_alpha != 0``.
        TRL averages the NLL over all chosen tokens of the batch instead of per pair:
        for equal-length chosen responses the two agree.
      chosen_lengths, rejected_lengths: ``[B]`` token counts (``ipo``/``simpo``).

    Returns:
      ``(loss [B], metrics)``: ``rewards/*`` = ``beta`` times the (transformed) log-probs,
      ``logps/*`` the log-probs used, ``nll_loss``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; valid: {', '.join(CPO_LOSS_TYPES)}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing is not used by CPO's {loss_type!r} loss; set it to 0")
    _check_beta(beta)
    pc, pr = jnp.asarray(policy_chosen_logps), jnp.asarray(policy_rejected_logps)
    acc = _acc_dtype(jnp.result_type(pc, pr, jnp.float32))
    pc, pr = _f(pc, acc), _f(pr, acc)
    if loss_type in ("ipo", "simpo"):
        pc = _per_token(pc, chosen_lengths, "chosen_lengths", f"cpo/{loss_type}")
        pr = _per_token(pr, rejected_lengths, "rejected_lengths", f"cpo/{loss_type}")
    if alpha:
        rc_, rr_ = (1.0 - jnp.exp(-alpha * pc)) / alpha, (1.0 - jnp.exp(-alpha * pr)) / alpha
    else:
        rc_, rr_ = pc, pr
    x = rc_ - rr_
    ls = float(label_smoothing)
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * x, ls)
    elif loss_type == "simpo":
        loss = _smoothed_sigmoid(beta * (x - simpo_gamma / beta), ls)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1.0 - beta * x)
    else:
        loss = (x - 0.5 / beta) ** 2
    if cpo_alpha:
        if chosen_nll is None:
            raise ValueError("cpo_loss with cpo_alpha != 0 needs chosen_nll ([B] chosen NLL per pair)")
        nll = _f(chosen_nll, acc)
        loss = loss + cpo_alpha * nll
    else:
        nll = jnp.zeros_like(loss) if chosen_nll is None else _f(chosen_nll, acc)
    metrics = _reward_metrics(beta * rc_, beta * rr_, pc, pr)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics


def _log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_nll: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """ORPO (reference-free), per pair: ``chosen_nll - beta * log s(log_odds)``.

    With average log-probs ``a_c = pi_c/n_c``, ``a_r = pi_r/n_r``:
    ``log_odds = (a_c - a_r) - (log(1-exp(a_c)) - log(1-exp(a_r)))``. The averages are
    clamped to ``<= -1e-6`` so that an empty or certain response gives a finite value.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
      chosen_nll: ``[B]`` chosen NLL per pair (mean token cross-entropy; TRL averages over
        all chosen tokens of the batch instead).
      chosen_lengths, rejected_lengths: ``[B]`` token counts.

    Returns:
      ``(loss [B], metrics)``: ``rewards/*`` = ``beta * a``, ``logps/*`` = ``a``, plus
      ``log_odds_ratio`` (``log s(log_odds)``), ``log_odds_chosen`` and ``nll_loss``.
    """
    _check_beta(beta)
    pc, pr = jnp.asarray(policy_chosen_logps), jnp.asarray(policy_rejected_logps)
    acc = _acc_dtype(jnp.result_type(pc, pr, jnp.float32))
    a_c = _per_token(_f(pc, acc), chosen_lengths, "chosen_lengths", "orpo")
    a_r = _per_token(_f(pr, acc), rejected_lengths, "rejected_lengths", "orpo")
    a_c, a_r = jnp.minimum(a_c, -1e-6), jnp.minimum(a_r, -1e-6)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = _f(chosen_nll, acc)
    loss = nll - beta * ratio
    metrics = _reward_metrics(beta * a_c, beta * a_r, a_c, a_r)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss the trainer can select by name.

    ``inputs`` are the per-pair array inputs it reads (besides the two policy log-probs);
    ``hparams`` the keyword hyper-parameters it accepts.
    """

    name: str
    fn: Callable[..., tuple[Array, dict[str, Array]]]
    fixed: Mapping[str, Any]
    needs_reference: bool
    inputs: tuple[str, ...]
    hparams: tuple[str, ...]


def _dpo_inputs(t):
    base = ("ref_chosen_logps", "ref_rejected_logps")
    if t in _NEEDS_LENGTHS:
        base += ("chosen_lengths", "rejected_lengths")
    if t in ("aot", "aot_unpaired"):
        base += ("pair_mask",)
    return base


def _dpo_hparams(t):
    h = ("beta",)
    if t in _USES_LABEL_SMOOTHING:
        h += ("label_smoothing",)
    if t == "bco_pair":
        h += ("bco_reward_mean",)
    if t == "discopop":
        h += ("discopop_tau",)
    return h


def _build_registry() -> dict[str, LossSpec]:
    reg: dict[str, LossSpec] = {}
    for t in DPO_LOSS_TYPES:
        reg[t] = LossSpec(t, dpo_loss, {"loss_type": t}, True, _dpo_inputs(t), _dpo_hparams(t))
    reg["dpo"] = dataclasses.replace(reg["sigmoid"], name="dpo")
    lens = ("chosen_lengths", "rejected_lengths")
    reg["simpo"] = LossSpec("simpo", simpo_loss, {"loss_type": "sigmoid"}, False, lens,
                            ("beta", "gamma_beta_ratio", "label_smoothing"))
    reg["simpo_hinge"] = LossSpec("simpo_hinge", simpo_loss, {"loss_type": "hinge"}, False, lens,
                                  ("beta", "gamma_beta_ratio"))
    for t in CPO_LOSS_TYPES:
        name = "cpo" if t == "sigmoid" else f"cpo_{t}"
        hp = ("beta", "cpo_alpha", "alpha")
        if t in ("sigmoid", "simpo"):
            hp += ("label_smoothing",)
        if t == "simpo":
            hp += ("simpo_gamma",)
        ins = ("chosen_nll",) + (lens if t in ("ipo", "simpo") else ())
        reg[name] = LossSpec(name, cpo_loss, {"loss_type": t}, False, ins, hp)
    reg["orpo"] = LossSpec("orpo", orpo_loss, {}, False, ("chosen_nll",) + lens, ("beta",))
    return reg


LOSSES: dict[str, LossSpec] = _build_registry()
"""Loss name -> :class:`LossSpec`. DPO family: TRL's loss-type names (and ``dpo`` = ``sigmoid``);
reference-free: ``simpo``, ``simpo_hinge``, ``cpo``, ``cpo_hinge``, ``cpo_ipo``, ``cpo_simpo``, ``orpo``."""


def _spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None


def needs_reference(name: str) -> bool:
    """Whether loss ``name`` needs reference-model log-probs."""
    return _spec(name).needs_reference


def compute_preference_loss(
    name: str,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    *,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    chosen_nll: Array | None = None,
    pair_mask: Array | None = None,
    **hparams,
) -> tuple[Array, dict[str, Array]]:
    """Dispatch on a loss name (see :data:`LOSSES`); returns ``(loss [B], metrics)``.

    Inputs a loss does not read are ignored (so a trainer can always pass everything);
    a missing required input or an hyper-parameter the loss does not take is a
    ``ValueError``.
    """
    spec = _spec(name)
    available = {
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "chosen_nll": chosen_nll,
        "pair_mask": pair_mask,
    }
    bad = sorted(set(hparams) - set(spec.hparams))
    if bad:
        raise ValueError(f"loss {name!r} does not take {bad}; it takes {list(spec.hparams)}")
    kwargs: dict[str, Any] = dict(spec.fixed)
    kwargs.update(hparams)
    for key in spec.inputs:
        val = available[key]
        if val is None and key != "pair_mask":
            if key == "chosen_nll" and spec.fn is cpo_loss and hparams.get("cpo_alpha", 1.0) == 0:
                continue
            raise ValueError(f"loss {name!r} needs {key}")
        kwargs[key] = val
    if spec.fn is dpo_loss:
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps,
            kwargs.pop("ref_chosen_logps"), kwargs.pop("ref_rejected_logps"), **kwargs,
        )
    return spec.fn(policy_chosen_logps, policy_rejected_logps, **kwargs)


# --------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------


def reduce_pairs(values, pair_weights: Array | None = None):
    """Weighted ``(sum, count)`` over pairs, for exact accumulation across micro-batches/hosts.

    Args:
      values: ``[B]`` array or a mapping of name -> ``[B]`` array (e.g. the metrics).
      pair_weights: ``[B]`` weights (``pair_valid``); ``None`` means all ones. Pairs of
        weight 0 contribute exactly nothing, even if their value is NaN or inf.

    Returns:
      ``(sum, count)`` float32 scalars, or a dict of them. The mean over all micro-batches
      and hosts is ``sum(sums) / sum(counts)`` (see :func:`safe_mean`).
    """
    if isinstance(values, Mapping):
        return {k: reduce_pairs(v, pair_weights) for k, v in values.items()}
    v = jnp.asarray(values)
    acc = _acc_dtype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.float32
    v = v.astype(acc)
    w = jnp.ones(v.shape, acc) if pair_weights is None else jnp.asarray(pair_weights).astype(acc)
    if w.shape != v.shape:
        raise ValueError(f"reduce_pairs: values {v.shape} and pair_weights {w.shape} differ")
    total = jnp.sum(jnp.where(w != 0, v * w, jnp.zeros((), acc)))
    return total, jnp.sum(w)


def safe_mean(total: Array, count: Array) -> Array:
    """``total / count``, and 0 when ``count == 0``."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), jnp.zeros_like(total))


# --------------------------------------------------------------------------------------
# Prefix margins M_k (reward-generation gap diagnostics)
# --------------------------------------------------------------------------------------


def _compact_left(values: Array, mask: Array) -> Array:
    """Move each row's masked values to the front, in order; zeros after. ``[B, T] -> [B, T]``."""
    m = mask.astype(bool)
    pos = jnp.cumsum(m.astype(jnp.int32), axis=-1) - 1
    seq = values.shape[-1]
    idx = jnp.where(m, pos, seq)  # out of range -> dropped
    rows = jnp.arange(values.shape[0])[:, None]
    out = jnp.zeros(values.shape, values.dtype)
    return out.at[rows, idx].add(jnp.where(m, values, 0), mode="drop")


def prefix_margins(
    policy_token_logps_c: Array,
    policy_token_logps_r: Array,
    ref_token_logps_c: Array,
    ref_token_logps_r: Array,
    mask_c: Array,
    mask_r: Array,
    beta: float,
) -> Array:
    """Prefix reward margins ``M [B, K]``, ``K = max(Tc, Tr)``.

    ``M[:, k-1] = beta * sum_{t<=k} (log pi/pi_ref(chosen_t) - log pi/pi_ref(rejected_t))``
    with ``t`` counted from each response's own first masked token; positions past a
    response's end contribute 0, so ``M[:, k-1]`` for ``k >= max(n_c, n_r)`` is the full
    DPO margin ``rewards/chosen - rewards/rejected``.

    Args:
      policy_token_logps_c, ref_token_logps_c, mask_c: ``[B, Tc]`` (chosen rows).
      policy_token_logps_r, ref_token_logps_r, mask_r: ``[B, Tr]`` (rejected rows).
      beta: DPO beta.

    Returns:
      ``[B, K]`` float32.
    """
    acc = _acc_dtype(jnp.result_type(policy_token_logps_c, policy_token_logps_r, jnp.float32))
    lc = jnp.asarray(policy_token_logps_c).astype(acc) - jnp.asarray(ref_token_logps_c).astype(acc)
    lr = jnp.asarray(policy_token_logps_r).astype(acc) - jnp.asarray(ref_token_logps_r).astype(acc)
    if lc.shape != jnp.shape(mask_c) or lr.shape != jnp.shape(mask_r) or lc.shape[0] != lr.shape[0]:
        raise ValueError(
            f"prefix_margins: chosen {lc.shape} / mask {jnp.shape(mask_c)}, rejected {lr.shape} / "
            f"mask {jnp.shape(mask_r)} do not match"
        )
    cc = _compact_left(lc, jnp.asarray(mask_c))
    cr = _compact_left(lr, jnp.asarray(mask_r))
    width = max(cc.shape[1], cr.shape[1])
    cc = jnp.pad(cc, ((0, 0), (0, width - cc.shape[1])))
    cr = jnp.pad(cr, ((0, 0), (0, width - cr.shape[1])))
    return beta * jnp.cumsum(cc - cr, axis=1)


def prefix_margins_at(margins: Array, k: Array) -> Array:
    """``M`` at per-pair prefix lengths: ``[B, K]``, ``k [B]`` (or ``[B, F]``) ints -> same shape as ``k``.

    ``k`` is clipped to ``[0, K]``; ``k = 0`` gives 0.
    """
    m = jnp.asarray(margins)
    k = jnp.asarray(k).astype(jnp.int32)
    squeeze = k.ndim == 1
    k2 = k[:, None] if squeeze else k
    k2 = jnp.clip(k2, 0, m.shape[1])
    vals = jnp.take_along_axis(m, jnp.maximum(k2 - 1, 0), axis=1)
    vals = jnp.where(k2 > 0, vals, jnp.zeros((), m.dtype))
    return vals[:, 0] if squeeze else vals


def prefix_margins_at_fractions(
    margins: Array, chosen_lengths: Array, rejected_lengths: Array, fractions: Sequence[float]
) -> Array:
    """``M`` at relative positions: for each fraction ``f``, ``k = max(1, ceil(f * min(n_c, n_r)))``
    (the same exact rule as ``poet_keep_lengths(..., "min", f)``; 0 for an empty pair).

    Returns ``[B, F]``.
    """
    nc = jnp.asarray(chosen_lengths).astype(jnp.int32)
    nr = jnp.asarray(rejected_lengths).astype(jnp.int32)
    ks = jnp.stack([poet_keep_lengths(nc, nr, "min", float(f))[0] for f in fractions], axis=1)
    return prefix_margins_at(margins, ks)
