"""Optimizer and learning-rate schedule (optax), matching Hugging Face Trainer's conventions.

- Schedule: linear warmup from 0 over ``ceil(warmup_ratio * total_steps)`` steps, then
  cosine / linear decay to 0 at ``total_steps`` or a constant; the optimizer step with
  index s (0-based) uses ``schedule(s)``, as transformers' LambdaLR does.
- AdamW with decoupled weight decay applied only to parameters with ndim >= 2 (HF
  Trainer excludes biases and norm weights), after global-norm gradient clipping.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: ``ceil(warmup_ratio * total_steps)`` (transformers' rule)."""
    return int(math.ceil(warmup_ratio * total_steps))


def make_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.0, kind: str = "cosine") -> optax.Schedule:
    """Learning rate as a function of the 0-based optimizer step.

    ``kind``: ``cosine`` (0.5 * (1 + cos(pi * progress))), ``linear`` (1 - progress) or
    ``constant``, after linear warmup from 0; ``progress`` runs from 0 at the end of warmup
    to 1 at ``total_steps``.
    """
    total = max(int(total_steps), 1)
    warm = warmup_steps(total, warmup_ratio)
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule: unknown schedule {kind!r} (cosine, linear, constant)")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm_f = jnp.where(warm > 0, step / max(warm, 1), 1.0)
        progress = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = 1.0 - progress
        else:
            decay = jnp.ones_like(progress)
        factor = jnp.where(step < warm, warm_f, decay)
        return lr * factor

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay (ndim >= 2: matrices and embeddings)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` from an ``OptimSection``: clip -> AdamW(schedule, masked decay)."""
    schedule = make_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_ratio, optim_cfg.schedule)
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
