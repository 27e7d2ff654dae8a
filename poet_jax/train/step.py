"""Train state and the pure preference train / eval steps.

The model is split with ``nnx.split`` into a static ``graphdef`` and pytrees (``params``:
the ``nnx.Param`` leaves; ``rest``: any other state), so a step is a pure function of
pytrees that ``jax.jit`` compiles with explicit shardings and a donated state.

Batch layout given to :func:`train_step` (numpy or jax arrays, ``A`` accumulation
micro-batches of ``b`` pairs each, rows of one micro-batch: ``b`` chosen then ``b``
rejected, as in ``PreferenceBatch``)::

    input_ids, attention_mask, response_mask   int32 [A, 2b, L]
    pair_valid                                 int32 [A, b]
    ref_logps (precomputed reference only)     float32 [A, 2b]  summed reference log-probs per row

Gradient accumulation is exact: the per-pair losses of all micro-batches are summed and
divided once by the number of valid pairs of the whole global batch, so 4 x 2 pairs and
8 x 1 pairs give the same update (up to float summation order).

Row groups (multi-process): with ``StepConfig.row_groups = G`` the ``2b`` rows of a
micro-batch are G consecutive blocks, each ``[its b/G chosen rows; its b/G rejected
rows]`` -- the layout one gets by concatenating the local batches of G processes along
the row axis without moving any data. ``G = 1`` is the single-process layout above.

Non-finite guard: if the loss or the gradient norm of a step is NaN/Inf, the step returns
the old params and optimizer state (only ``step`` advances: the batch was consumed) and
the metric ``nonfinite`` is 1.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from poet_jax import losses

F32 = jnp.float32


@struct.dataclass
class TrainState:
    """Everything a step updates (a pytree).

    ``params``: policy ``nnx.Param`` state (master dtype). ``opt_state``: optax state.
    ``step``: int32 scalar, optimizer steps done. ``ref_params``: the frozen reference's
    params (possibly bf16) or None; carried through unchanged and never checkpointed.
    ``rest``: non-parameter model state (usually empty).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rest: Any = None
    ref_params: Any = None

    def checkpoint_tree(self) -> dict:
        """The part that is saved: ``{"params", "opt_state", "step"}``."""
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the step function.

    ``loss``: name in ``losses.LOSSES``; ``hparams``: sorted (key, value) pairs passed to it;
    ``reference``: ``frozen`` | ``precomputed`` | ``none``; ``logps_chunk``: positions per
    chunk for token log-probs (0 = whole sequence); ``row_groups``: blocks of
    ``[chosen; rejected]`` rows per micro-batch (the process count; see the module
    docstring); ``packed``: micro-batches are ``PackedBatch.as_dict()`` arrays (shared-prompt /
    packed rows, see :func:`packed_micro_batch_sums`); ``inject_nan_at_step``: test-only, the loss of that 1-based step becomes NaN
    (0 = off; ``POET_JAX_INJECT_NAN_AT_STEP``).
    """

    loss: str = "dpo"
    hparams: tuple[tuple[str, Any], ...] = (("beta", 0.1),)
    reference: str = "frozen"
    logps_chunk: int = 0
    row_groups: int = 1
    inject_nan_at_step: int = 0
    packed: bool = False

    @property
    def beta(self) -> float:
        return float(dict(self.hparams).get("beta", 0.1))


def loss_hparams(loss_cfg) -> tuple[tuple[str, Any], ...]:
    """Keyword hyper-parameters of the configured loss (only those it accepts), as a sorted tuple."""
    spec = losses.LOSSES[loss_cfg.name]
    available = {
        "beta": loss_cfg.beta,
        "gamma_beta_ratio": loss_cfg.gamma_beta_ratio,
        "label_smoothing": loss_cfg.label_smoothing,
    }
    out = {k: v for k, v in available.items() if k in spec.hparams}
    for k, v in (loss_cfg.extra or {}).items():
        if k not in spec.hparams:
            from .config import ConfigError

            raise ConfigError(f"loss.extra.{k}: loss {loss_cfg.name!r} takes {list(spec.hparams)}")
        out[k] = v
    return tuple(sorted(out.items()))


# ----------------------------------------------------------------------------- forward pieces


def sequence_stats(model, input_ids, attention_mask, response_mask, chunk: int) -> dict[str, jax.Array]:
    """Per-row summed response log-probs and diagnostics of one forward pass.

    Args:
      model: a CausalLM (``hidden_states`` / ``logits_from_hidden``).
      input_ids, attention_mask, response_mask: ``[R, L]`` int.
      chunk: sequence positions per log-prob chunk (0 = all at once).

    Returns (all ``[R]`` float32): ``logps`` (sum of log p over response tokens, token t
    predicted from position t-1), ``n_tokens`` (response tokens), ``logit_sum`` (sum over
    response positions of the vocabulary-mean logit, for TRL's ``logits/*``), and
    ``token_logps`` ``[R, L-1]``.
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].astype(bool)
    seq = hidden.shape[1]
    if chunk and chunk < seq:
        tlp, mean_logit = _chunked_logps(model.logits_from_hidden, hidden, targets, chunk)
    else:
        logits = model.logits_from_hidden(hidden)
        tlp = losses.token_logps(logits, targets)
        mean_logit = jnp.mean(logits.astype(F32), axis=-1)
    logps = losses.sequence_logps(tlp, mask)
    return {
        "logps": logps,
        "n_tokens": jnp.sum(mask, axis=-1).astype(F32),
        "logit_sum": jnp.sum(jnp.where(mask, jax.lax.stop_gradient(mean_logit), 0.0), axis=-1),
        "token_logps": tlp,
    }


def _chunked_logps(project, hidden, targets, chunk: int):
    """Token log-probs and vocabulary-mean logits ``[R, T]`` with at most ``[R, chunk, V]`` logits live."""
    rows, seq, dim = hidden.shape
    n = -(-seq // chunk)
    pad = n * chunk - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h = jnp.moveaxis(hidden.reshape(rows, n, chunk, dim), 1, 0)
    t = jnp.moveaxis(targets.reshape(rows, n, chunk), 1, 0)

    @jax.checkpoint
    def one(args):
        hc, tc = args
        logits = project(hc)
        return losses.token_logps(logits, tc), jnp.mean(logits.astype(F32), axis=-1)

    tlp, ml = jax.lax.map(one, (h, t))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(rows, n * chunk)[:, :seq]  # noqa: E731
    return unchunk(tlp), unchunk(ml)


def _split_rows(x, groups: int = 1):
    """``[2b, ...]`` rows -> (chosen ``[b, ...]``, rejected ``[b, ...]``) for ``groups`` blocks of [chosen; rejected]."""
    if groups == 1:
        b = x.shape[0] // 2
        return x[:b], x[b:]
    g = x.reshape(groups, 2, -1, *x.shape[1:])
    return g[:, 0].reshape(-1, *x.shape[1:]), g[:, 1].reshape(-1, *x.shape[1:])


def _pair_to_rows(v, groups: int = 1):
    """Per-pair ``[b]`` -> per-row ``[2b]`` in the row layout of :func:`_split_rows`."""
    if groups == 1:
        return jnp.concatenate([v, v])
    g = v.reshape(groups, 1, -1)
    return jnp.concatenate([g, g], axis=1).reshape(-1)


def pair_losses(cfg: StepConfig, pol: dict, ref_logps: jax.Array | None) -> tuple[jax.Array, dict]:
    """Per-pair loss ``[b]`` and per-pair metrics from row statistics (``[2b]`` each)."""
    g = cfg.row_groups
    pc, pr = _split_rows(pol["logps"], g)
    nc, nr = _split_rows(pol["n_tokens"], g)
    kwargs = {}
    if ref_logps is not None:
        kwargs["ref_chosen_logps"], kwargs["ref_rejected_logps"] = _split_rows(ref_logps, g)
    chosen_nll = -pc / jnp.maximum(nc, 1.0)
    loss, metrics = losses.compute_preference_loss(
        cfg.loss, pc, pr, chosen_lengths=nc, rejected_lengths=nr, chosen_nll=chosen_nll,
        **kwargs, **dict(cfg.hparams),
    )
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    metrics["poet/k"] = jnp.minimum(nc, nr)
    return loss, metrics


def micro_batch_sums(cfg: StepConfig, params, graphdef, rest, ref_params, mb: dict):
    """Sum over valid pairs of the loss (differentiable) and of every metric, for one micro-batch.

    Returns ``(loss_sum, sums)`` where ``sums`` maps metric names to float32 scalars and
    includes ``pairs`` (valid pairs), ``tokens`` (real tokens in the batch),
    ``logits/chosen_sum`` etc. for token-weighted means.
    """
    if cfg.packed:
        return packed_micro_batch_sums(cfg, params, graphdef, rest, ref_params, mb)
    model = nnx.merge(graphdef, params, rest)
    pol = sequence_stats(model, mb["input_ids"], mb["attention_mask"], mb["response_mask"], cfg.logps_chunk)
    if cfg.reference == "frozen":
        ref_model = nnx.merge(graphdef, ref_params, rest)
        ref = sequence_stats(ref_model, mb["input_ids"], mb["attention_mask"], mb["response_mask"], cfg.logps_chunk)
        ref_logps = jax.lax.stop_gradient(ref["logps"])
    elif cfg.reference == "precomputed":
        ref_logps = mb["ref_logps"].astype(F32)
    else:
        ref_logps = None
    valid = mb["pair_valid"].astype(F32)
    vrow = _pair_to_rows(valid, cfg.row_groups)
    tokens = jnp.sum(mb["attention_mask"].astype(F32) * vrow[:, None])
    return _reduce_micro_batch(cfg, pol, ref_logps, valid, tokens)


def _reduce_micro_batch(cfg: StepConfig, pol: dict, ref_logps, valid: jax.Array, tokens: jax.Array):
    """``(loss_sum, sums)`` of one micro-batch from its row statistics ``pol`` (``[2b]`` each), the
    reference log-probs, the pair validity ``[b]`` float32 and its count of real tokens."""
    loss, metrics = pair_losses(cfg, pol, ref_logps)
    loss_sum, count = losses.reduce_pairs(loss, valid)
    sums = {k: losses.reduce_pairs(v, valid)[0] for k, v in metrics.items()}
    sums["pairs"] = count
    # token-weighted TRL metrics: mean logit over chosen / rejected response tokens
    vrow = _pair_to_rows(valid, cfg.row_groups)
    lc, lr = _split_rows(pol["logit_sum"] * vrow, cfg.row_groups)
    tc, tr = _split_rows(pol["n_tokens"] * vrow, cfg.row_groups)
    sums.update(
        {
            "logits/chosen_sum": jnp.sum(lc),
            "logits/rejected_sum": jnp.sum(lr),
            "tokens/chosen": jnp.sum(tc),
            "tokens/rejected": jnp.sum(tr),
            "tokens": tokens,
        }
    )
    return loss_sum, sums


def packed_micro_batch_sums(cfg: StepConfig, params, graphdef, rest, ref_params, mb: dict):
    """:func:`micro_batch_sums` for one packed / shared-prompt micro-batch (``cfg.packed``).

    ``mb``: ``PackedBatch.as_dict()`` arrays, int32 ``[R, L]`` rows and ``pair_valid`` ``[R, M]``;
    with the precomputed reference also ``ref_logps`` float32 ``[2N]`` (``N = R * M`` pair slots,
    chosen then rejected). Per-pair results match the two-row path; ``tokens`` counts the real
    (non-padding) slots of the rows.
    """
    from .packed import packed_reference_logps, packed_sequence_stats

    if cfg.row_groups != 1:
        raise ValueError(f"packed layouts need StepConfig.row_groups=1, got {cfg.row_groups}")
    model = nnx.merge(graphdef, params, rest)
    pol = packed_sequence_stats(model, mb, cfg.logps_chunk)
    if cfg.reference == "frozen":
        ref_logps = packed_reference_logps(graphdef, ref_params, rest, mb, cfg.logps_chunk)
    elif cfg.reference == "precomputed":
        ref_logps = mb["ref_logps"].astype(F32)
    else:
        ref_logps = None
    valid = mb["pair_valid"].reshape(-1).astype(F32)
    return _reduce_micro_batch(cfg, pol, ref_logps, valid, jnp.sum((mb["segment_ids"] > 0).astype(F32)))


def finalize_metrics(sums: dict) -> dict:
    """Means from summed metrics: per-pair metrics / pairs, ``logits/*`` / response tokens."""
    pairs = sums["pairs"]
    out = {}
    for k, v in sums.items():
        if k in ("pairs", "tokens") or k.startswith("tokens/") or k.endswith("_sum"):
            continue
        out[k] = losses.safe_mean(v, pairs)
    out["logits/chosen"] = losses.safe_mean(sums["logits/chosen_sum"], sums["tokens/chosen"])
    out["logits/rejected"] = losses.safe_mean(sums["logits/rejected_sum"], sums["tokens/rejected"])
    out["pairs"] = pairs
    out["tokens"] = sums["tokens"]
    out["response_tokens"] = sums["tokens/chosen"] + sums["tokens/rejected"]
    return out


# ----------------------------------------------------------------------------- steps


def train_step(cfg: StepConfig, graphdef, tx: optax.GradientTransformation, schedule, state: TrainState, batch: dict):
    """One optimizer step over ``A`` accumulated micro-batches (pure; see module docstring).

    Returns ``(new_state, metrics)``; metrics are float32 scalars: the loss and TRL
    metrics averaged over valid pairs, ``grad_norm`` (before clipping), ``learning_rate``,
    ``nonfinite`` (1 if the update was dropped because the loss or gradient was NaN/Inf).
    """
    poison = None
    if cfg.inject_nan_at_step:
        poison = jnp.where(state.step + 1 == cfg.inject_nan_at_step, jnp.float32(jnp.nan), jnp.float32(1.0))

    def loss_fn(p, mb):
        loss_sum, sums = micro_batch_sums(cfg, p, graphdef, state.rest, state.ref_params, mb)
        if poison is not None:
            loss_sum = loss_sum * poison
        return loss_sum, sums

    def micro(carry, mb):
        grads_acc, sums_acc = carry
        (loss_sum, sums), grads = jax.value_and_grad(lambda p: loss_fn(p, mb), has_aux=True)(state.params)
        sums["loss"] = loss_sum
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
        return (grads_acc, sums_acc), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), state.params)
    first = jax.tree.map(lambda x: x[0], batch)
    sums_shape = jax.eval_shape(
        lambda: micro_batch_sums(cfg, state.params, graphdef, state.rest, state.ref_params, first)[1]
    )
    zeros_s = {k: jnp.zeros((), F32) for k in sums_shape}
    zeros_s["loss"] = jnp.zeros((), F32)
    (grads, sums), _ = jax.lax.scan(micro, (zeros_g, zeros_s), batch)
    n = jnp.maximum(sums["pairs"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = finalize_metrics(sums)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["nonfinite"] = 1.0 - finite.astype(F32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(cfg: StepConfig, graphdef, state: TrainState, batch: dict) -> dict:
    """Summed metrics (including ``loss``) of one ``[2b, L]`` batch; combine with :func:`finalize_metrics`."""
    loss_sum, sums = micro_batch_sums(cfg, state.params, graphdef, state.rest, state.ref_params, batch)
    sums["loss"] = loss_sum
    return sums


def row_logps(graphdef, params, rest, batch: dict, chunk: int) -> jax.Array:
    """Summed response log-probs ``[2b]`` of one ``[2b, L]`` batch (the reference precompute pass)."""
    model = nnx.merge(graphdef, params, rest)
    return sequence_stats(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], chunk)["logps"]


def make_state(model, tx: optax.GradientTransformation, ref_params=None, mesh=None) -> tuple[Any, TrainState]:
    """``(graphdef, TrainState)`` from an NNX model: params, fresh optimizer state, step 0.

    With ``mesh``, every leaf ends up with a ``NamedSharding`` on it: optimizer moments take
    their parameter's sharding, scalars (step, Adam's count) are replicated.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is None:
        opt_state = jax.jit(tx.init)(params)
        step = jnp.zeros((), jnp.int32)
    else:
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(mesh, PartitionSpec())
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        abstract = jax.eval_shape(tx.init, params)
        opt_shardings = _match_shardings(abstract, params, param_shardings, replicated)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        rest = jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                            else jax.device_put(x, replicated), rest)
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state, rest=rest, ref_params=ref_params)


def _match_shardings(abstract_opt, params, param_shardings, replicated):
    """Shardings for an optimizer-state tree: a subtree shaped like ``params`` gets the params' shardings."""
    p_struct = jax.tree.structure(params)
    p_shapes = [x.shape for x in jax.tree.leaves(params)]

    def is_param_like(node):
        try:
            return jax.tree.structure(node) == p_struct and [x.shape for x in jax.tree.leaves(node)] == p_shapes
        except Exception:  # noqa: BLE001 - not a pytree of arrays
            return False

    def assign(node):
        if is_param_like(node):
            return param_shardings
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, abstract_opt, is_leaf=is_param_like)


def jit_train_step(cfg: StepConfig, graphdef, tx, schedule, state_shardings, batch_sharding):
    """``jax.jit`` of :func:`train_step` with explicit shardings; the state argument is donated."""
    fn = partial(train_step, cfg, graphdef, tx, schedule)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, _replicated_like(state_shardings)), donate_argnums=(0,))


def jit_eval_step(cfg: StepConfig, graphdef, state_shardings, batch_sharding):
    fn = partial(eval_step, cfg, graphdef)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=_replicated_like(state_shardings))


def _replicated_like(shardings):
    """A fully replicated ``NamedSharding`` on the mesh of ``shardings`` (None without a mesh).

    Metrics come back replicated, so every process can read them (``float()``) even when
    the mesh spans several processes.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec())
    return None
