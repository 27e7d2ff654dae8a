"""Prefix-margin diagnostics ``M_k``: where in a response the implicit-reward margin lives.

For a pair (chosen ``w``, rejected ``l``) and a policy ``pi`` against a reference ``pi_ref``::

    M_k = beta * sum_{t<=k} [log pi/pi_ref (w_t) - log pi/pi_ref (l_t)]

with ``t`` counted from each response's own first token; tokens past a response's end
contribute 0 (``losses.prefix_margins``). So ``M_k`` at ``k >= max(n_w, n_l)`` is the
sequence-level DPO margin (``rewards/margins``) and ``M_k`` at ``k = min(n_w, n_l)`` is the
DPO+POET margin. A reward-generation gap shows as a large full margin with a small (or
negative) ``M_k`` at small ``k``.

:func:`prefix_margin_report` runs policy and reference over held-out pairs and reduces
``M_k`` at every absolute ``k`` (``1..K``) and at relative positions (fractions of the
shorter response, ``k = max(1, ceil(f * min(n_w, n_l)))``) to the mean margin and the
fraction of pairs with ``M_k > 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poet_jax import losses
from poet_jax.data import eval_plans, batch_from_plan, row_lengths

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _token_logps_jit(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)
    return losses.token_logps(logits[:, :-1], input_ids[:, 1:])


_prefix_margins_jit = jax.jit(losses.prefix_margins, static_argnames=("beta",))


@functools.partial(jax.jit, static_argnums=0)
def _last_logits_jit(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    return model.logits_from_hidden(model.hidden_states(input_ids, attention_mask)[:, -1])


def last_token_logits(model, input_ids, attention_mask) -> np.ndarray:
    """``[R, V]`` float32 next-token logits after each (left-padded) row, jitted per shape."""
    graphdef, state = nnx.split(model)
    out = _last_logits_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))
    return np.asarray(jax.device_get(out), np.float32)


def row_token_logps(model, input_ids, attention_mask) -> np.ndarray:
    """Per-token log-probs of each row's own next tokens under ``model``.

    Args:
      model: a ``poet_jax.models.CausalLM``.
      input_ids, attention_mask: ``[R, L]`` int (right padding).

    Returns:
      ``[R, L-1]`` float32 numpy: entry ``t`` is ``log p(input_ids[t+1] | input_ids[:t+1])``
      (score it under ``response_mask[:, 1:]``). Compiled once per model structure and shape.
    """
    graphdef, state = nnx.split(model)
    out = _token_logps_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))
    return np.asarray(jax.device_get(out), np.float32)


@dataclasses.dataclass
class PrefixMarginReport:
    """``M_k`` statistics over ``n_pairs`` held-out pairs.

    ks: ``[K]`` absolute prefix lengths ``1..K`` (K = longest response).
    mean_by_k, positive_by_k: ``[K]`` mean ``M_k`` and fraction of pairs with ``M_k > 0``.
    fractions: relative positions (of the shorter response); mean_by_fraction,
    positive_by_fraction: ``[F]`` the same statistics there.
    margin: mean full-sequence margin (= ``rewards/margins``); accuracy: fraction of
    pairs with a positive full margin (= ``rewards/accuracies``).
    mean_min_length: mean ``min(n_w, n_l)``; margins: ``[N, K]`` per-pair ``M`` (pair order
    of the input examples).
    """

    beta: float
    n_pairs: int
    ks: np.ndarray
    mean_by_k: np.ndarray
    positive_by_k: np.ndarray
    fractions: tuple[float, ...]
    mean_by_fraction: np.ndarray
    positive_by_fraction: np.ndarray
    margin: float
    accuracy: float
    mean_min_length: float
    margins: np.ndarray = dataclasses.field(repr=False)
    chosen_lengths: np.ndarray | None = dataclasses.field(default=None, repr=False)
    rejected_lengths: np.ndarray | None = dataclasses.field(default=None, repr=False)
    policy_logps: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def simpo_accuracy(self) -> float:
        """Fraction of pairs whose policy per-token average log-prob is higher for the chosen
        response (SimPO's ``rewards/accuracies``); needs ``policy_logps`` ``[N, 2]`` summed."""
        if self.policy_logps is None:
            raise ValueError("this report has no policy log-probs (built by reduce_prefix_margins alone)")
        c = self.policy_logps[:, 0] / np.maximum(self.chosen_lengths, 1)
        r = self.policy_logps[:, 1] / np.maximum(self.rejected_lengths, 1)
        return float((c > r).mean())

    def at(self, k: int) -> tuple[float, float]:
        """``(mean M_k, fraction M_k > 0)`` at absolute ``k`` (``k`` past the end: full margin)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        i = min(k, len(self.ks)) - 1
        return float(self.mean_by_k[i]), float(self.positive_by_k[i])

    def to_dict(self, per_pair: bool = False) -> dict[str, Any]:
        d = {
            "beta": self.beta,
            "n_pairs": self.n_pairs,
            "k": self.ks.tolist(),
            "mean_M_k": self.mean_by_k.tolist(),
            "positive_M_k": self.positive_by_k.tolist(),
            "fractions": list(self.fractions),
            "mean_M_fraction": self.mean_by_fraction.tolist(),
            "positive_M_fraction": self.positive_by_fraction.tolist(),
            "margin": self.margin,
            "accuracy": self.accuracy,
            "mean_min_length": self.mean_min_length,
        }
        if per_pair:
            d["margins"] = self.margins.tolist()
        return d

    def metrics(self, prefix: str = "eval/", ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
        """Flat scalar metrics for a logger: ``M_k/mean@k``, ``M_k/pos@k``, ``M_frac/mean@f`` ..."""
        out = {f"{prefix}rewards/margins": self.margin, f"{prefix}rewards/accuracies": self.accuracy}
        for k in ks:
            m, p = self.at(k)
            out[f"{prefix}M_k/mean@{k}"] = m
            out[f"{prefix}M_k/positive@{k}"] = p
        for f, m, p in zip(self.fractions, self.mean_by_fraction, self.positive_by_fraction):
            out[f"{prefix}M_frac/mean@{f:g}"] = float(m)
            out[f"{prefix}M_frac/positive@{f:g}"] = float(p)
        return out

    def save_json(self, path: str | Path, per_pair: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(per_pair), indent=1))
        return path


def reduce_prefix_margins(
    margins: np.ndarray,
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    *,
    beta: float,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> PrefixMarginReport:
    """Statistics of per-pair prefix margins.

    Args:
      margins: ``[N, K]`` ``M`` per pair (``losses.prefix_margins``), ``K >= max length``.
      chosen_lengths, rejected_lengths: ``[N]`` int response lengths.
      beta, fractions: as in :func:`prefix_margin_report`.
    """
    m = np.asarray(margins, np.float64)
    nc = np.asarray(chosen_lengths, np.int64)
    nr = np.asarray(rejected_lengths, np.int64)
    if m.ndim != 2 or nc.shape != (m.shape[0],) or nr.shape != nc.shape:
        raise ValueError(f"margins [N, K] and lengths [N] expected, got {m.shape}, {nc.shape}, {nr.shape}")
    if m.shape[0] == 0:
        raise ValueError("no pairs to evaluate prefix margins on")
    K = int(max(nc.max(), nr.max()))
    if m.shape[1] < K:
        raise ValueError(f"margins have {m.shape[1]} positions but the longest response has {K} tokens")
    m = m[:, :K]
    frac = tuple(float(f) for f in fractions)
    at_f = np.asarray(losses.prefix_margins_at_fractions(m, nc, nr, frac), np.float64) if frac else np.zeros((len(m), 0))
    full = m[:, -1]
    return PrefixMarginReport(
        beta=float(beta),
        n_pairs=int(m.shape[0]),
        ks=np.arange(1, K + 1),
        mean_by_k=m.mean(0),
        positive_by_k=(m > 0).mean(0),
        fractions=frac,
        mean_by_fraction=at_f.mean(0),
        positive_by_fraction=(at_f > 0).mean(0),
        margin=float(full.mean()),
        accuracy=float((full > 0).mean()),
        mean_min_length=float(np.minimum(nc, nr).mean()),
        margins=m.astype(np.float32),
        chosen_lengths=nc,
        rejected_lengths=nr,
    )


def _pair_stats(policy, reference, batch, beta):
    ids, att, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    pol = row_token_logps(policy, ids, att)
    ref = row_token_logps(reference, ids, att)
    mask = resp[:, 1:]
    b = batch.num_pairs
    m = np.asarray(_prefix_margins_jit(pol[:b], pol[b:], ref[:b], ref[b:], mask[:b], mask[b:], beta=float(beta)),
                   np.float32)
    valid = batch.pair_valid.astype(bool)
    lens = mask.sum(1)
    sums = (pol * mask).sum(1)
    pol_sums = np.stack([sums[:b], sums[b:]], 1)
    return m[valid], lens[:b][valid], lens[b:][valid], pol_sums[valid]


def prefix_margin_report(
    policy,
    reference,
    examples: Sequence[Any],
    pad_id: int,
    *,
    beta: float,
    batch_size: int = 16,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    max_pairs: int | None = None,
) -> PrefixMarginReport:
    """``M_k`` over held-out pairs (``poet_jax.data.Example`` list, untruncated responses).

    Every batch is padded to one length (the longest row, rounded up to a multiple of
    16), so the forward pass compiles once. ``reference`` is the model the implicit
    reward is measured against (the initial policy); for reference-free losses (SimPO)
    this still shows how far training moved each prefix.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = list(examples)[: max_pairs or None]
    if not examples:
        raise ValueError("no held-out pairs to evaluate prefix margins on")
    lengths = row_lengths(examples)
    width = int(-(-int(lengths.max()) // 16) * 16)
    K = width - 1
    all_m, all_c, all_r, all_p, order = [], [], [], [], []
    for plan in eval_plans(lengths, batch_size, bucket_lengths=(width,), sort_by_length=False):
        batch = batch_from_plan(examples, plan, pad_id)
        m, c, r, p = _pair_stats(policy, reference, batch, beta)
        all_p.append(p)
        m = np.pad(m, ((0, 0), (0, K - m.shape[1])))
        all_m.append(m)
        all_c.append(c)
        all_r.append(r)
        order.append(plan.indices[plan.valid.astype(bool)])
    idx = np.argsort(np.concatenate(order), kind="stable")
    rep = reduce_prefix_margins(
        np.concatenate(all_m)[idx], np.concatenate(all_c)[idx], np.concatenate(all_r)[idx], beta=beta, fractions=fractions
    )
    rep.policy_logps = np.concatenate(all_p)[idx]
    return rep


def prefix_margin_metrics(
    graphdef,
    params,
    ref_params,
    examples: Sequence[Any],
    pad_id: int,
    *,
    beta: float,
    rest: Any = None,
    max_pairs: int = 256,
    batch_size: int = 16,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    prefix: str = "",
) -> dict[str, float]:
    """Flat ``M_k`` metrics for a trainer's evaluation (hook for ``Run.evaluate``).

    ``graphdef`` / ``params`` / ``rest``: the policy as split by ``nnx.split(model, nnx.Param, ...)``;
    ``ref_params``: the frozen reference's params (same graphdef). Evaluates the first
    ``max_pairs`` of ``examples`` (untruncated held-out pairs) and returns
    ``{prefix + "M_k/mean@k", "M_k/positive@k", "M_frac/mean@f", ...}`` (see
    :meth:`PrefixMarginReport.metrics`).
    """
    split = (graphdef, params) if rest is None else (graphdef, params, rest)
    policy = nnx.merge(*split)
    reference = nnx.merge(*((graphdef, ref_params) if rest is None else (graphdef, ref_params, rest)))
    rep = prefix_margin_report(policy, reference, examples, pad_id, beta=beta, batch_size=batch_size,
                               max_pairs=max_pairs)
    return rep.metrics(prefix=prefix, ks=ks)
