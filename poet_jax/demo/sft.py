"""Supervised fine-tuning of the demo's tiny model (the starting point of every preference run).

A tiny random Llama (``poet_jax.models.CausalLM``) is fitted to chat-formatted
``{"messages": [user, assistant]}`` records by minimising the mean token NLL of the
assistant response (prompt tokens are not scored), with AdamW and a warmup-cosine
schedule. The result is written as a Hugging Face directory (``save_pretrained`` +
tokenizer), which the trainer then loads as both initial policy and reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from poet_jax import losses
from poet_jax.models import CausalLM, from_pretrained, save_pretrained


def create_model(tokenizer, out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0) -> CausalLM:
    """A random Llama sized for ``tokenizer`` (bos/eos/pad ids from it), float32.

    The weights are drawn with numpy by ``poet_jax.train.tiny`` (fast: nothing to compile)
    and written with the tokenizer to ``out_dir`` (a Hugging Face directory), then loaded.
    """
    from poet_jax.demo.tokenizer import save_tokenizer
    from poet_jax.train.config import TinyModelSpec
    from poet_jax.train.tiny import create_tiny_model_dir

    out_dir = Path(out_dir)
    tok_dir = save_tokenizer(tokenizer, out_dir.with_name(out_dir.name + "_tokenizer"))
    spec = TinyModelSpec(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, seed=seed,
                         tokenizer=str(tok_dir))
    return from_pretrained(create_tiny_model_dir(out_dir, spec))


def encode_sft(tokenizer, records: Sequence[dict], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chat-template and pad SFT records.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask``: int32 ``[N, length]``, right
    padded with the pad id; ``loss_mask`` is 1 on the assistant response tokens (its
    end-of-turn token included).
    """
    n = len(records)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((n, length), pad, np.int32)
    att = np.zeros((n, length), np.int32)
    lm = np.zeros((n, length), np.int32)
    for i, rec in enumerate(records):
        msgs = rec["messages"]
        p = tokenizer(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"]
        f = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        if f[: len(p)] != p:
            raise ValueError(f"SFT record {i}: the rendered prompt is not a prefix of the conversation")
        if len(f) > length:
            raise ValueError(f"SFT record {i} has {len(f)} tokens, more than length={length}")
        ids[i, : len(f)] = f
        att[i, : len(f)] = 1
        lm[i, len(p): len(f)] = 1
    return ids, att, lm


def sft_train(
    model: CausalLM,
    tokenizer,
    records: Sequence[dict],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    length: int = 48,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[CausalLM, list[float]]:
    """Fit ``model`` to ``records`` for ``steps`` AdamW steps; returns the model and the losses.

    The model is updated in place (and returned). ``on_step(step, loss)`` is called
    after every step (e.g. a progress bar).
    """
    if steps < 1:
        raise ValueError(f"SFT steps must be >= 1, got {steps}")
    ids, att, lm = encode_sft(tokenizer, records, length)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2 + 1), steps, end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, att, lm):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            tlp = losses.token_logps(m(ids, att)[:, :-1], ids[:, 1:])
            mask = lm[:, 1:]
            return -jnp.sum(tlp * mask) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    history = []
    for s in range(steps):
        idx = rng.integers(0, len(ids), batch_size)
        params, opt_state, loss = step(params, opt_state, ids[idx], att[idx], lm[idx])
        history.append(float(loss))
        if on_step is not None:
            on_step(s + 1, history[-1])
    nnx.update(model, params)
    return model, history


def save_model(model: CausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Hugging Face directory of ``model`` with the demo tokenizer."""
    return save_pretrained(model, out_dir, tokenizer=tokenizer)
