"""The trainer: configuration, train state and pure steps, the loop, checkpoints, metrics.

    from poet_jax.train import load_config, train
    result = train(load_config("configs/tiny/dpo.yaml", ["optim.lr=1e-4"]))

Modules: ``config`` (schema, YAML + overrides, validation), ``step`` (TrainState, pure
train/eval steps), ``loop`` (setup, train, evaluation, checkpoints, export), ``optim``
(AdamW + schedules), ``reference`` (precomputed reference cache), ``flops`` (MFU),
``logger`` (JSONL / TensorBoard / tqdm), ``checkpoint`` (Orbax), ``export``
(checkpoint -> HF), ``tiny`` (tiny random Llama directories).
"""

from .config import Config, ConfigError, config_from_dict, load_config, schema_rows

__all__ = ["Config", "ConfigError", "config_from_dict", "export_checkpoint", "load_config", "schema_rows",
           "setup", "train"]


def __getattr__(name):  # heavy modules (jax, models, data) load on first use
    if name in ("train", "setup"):
        from . import loop

        return getattr(loop, name)
    if name == "export_checkpoint":
        from .export import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module 'poet_jax.train' has no attribute {name!r}")
