"""Export an Orbax training checkpoint of a run to a Hugging Face directory (``poet-jax export``)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from .checkpoint import Checkpointer
from .config import ConfigError, config_from_dict


def export_checkpoint(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None) -> Path:
    """Write the policy of checkpoint ``step`` (default: latest) of ``run_dir`` as an HF directory.

    The model structure and tokenizer come from the run's initial model directory (recorded
    in the checkpoint); the weights are the checkpoint's float32 master weights.
    """
    from flax import nnx
    from transformers import AutoTokenizer

    from poet_jax.models import from_pretrained, save_pretrained

    from .optim import make_optimizer

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"export: {run_dir} has no checkpoints/ folder (is it a train.output_dir?)")
    ckpt = Checkpointer(ckpt_dir)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"export: {ckpt_dir} holds no checkpoint")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise ConfigError(f"export: no checkpoint at step {step}; available: {sorted(steps)}")
        meta_cfg_path = run_dir / "config.yaml"
        if not meta_cfg_path.is_file():
            raise ConfigError(f"export: {meta_cfg_path} is missing")
        cfg = config_from_dict(yaml.safe_load(meta_cfg_path.read_text()))
        model_dir = _model_dir_of(ckpt, step, cfg)
        model = from_pretrained(model_dir, dtype=jnp.float32, param_dtype=jnp.float32)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(cfg.optim, 1)
        abstract = {
            "params": params,
            "opt_state": jax.eval_shape(tx.init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        tree, _meta = ckpt.restore(step, abstract)
        model = nnx.merge(graphdef, tree["params"], rest)
        out = Path(out_dir) if out_dir else run_dir / f"hf-step{step}"
        tok_dir = cfg.model.tokenizer or str(model_dir)
        save_pretrained(model, out, tokenizer=AutoTokenizer.from_pretrained(tok_dir))
        return out
    finally:
        ckpt.close()


def _model_dir_of(ckpt: Checkpointer, step: int, cfg) -> Path:
    """The initial model directory recorded with the checkpoint (falls back to the config's)."""
    meta_file = ckpt.directory / str(step) / "meta" / "metadata"
    for cand in (meta_file, ckpt.directory / str(step) / "meta"):
        if cand.is_file():
            try:
                d = json.loads(cand.read_text()).get("model_dir")
                if d and Path(d).is_dir():
                    return Path(d)
            except (ValueError, AttributeError):
                pass
    return Path(cfg.model.path)
