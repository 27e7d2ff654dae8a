"""Config ``data`` section -> :class:`poet_jax.data.DataConfig` -> tokenized examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from poet_jax.data import DataConfig, build_preference_data

from .config import Config, ConfigError


def data_config(cfg: Config, *, show_progress: bool = True) -> DataConfig:
    """The data pipeline's DataConfig for ``cfg`` (its ValueErrors become ConfigError naming data.<key>).

    Every ``data.*`` key that DataConfig also has is passed under its own name; the schema's
    0 / "" / [] stand for DataConfig's None, and the seed and cache location come from ``train``.
    """
    d = cfg.data
    shared = {f.name for f in dataclasses.fields(DataConfig)} & {f.name for f in dataclasses.fields(d)}
    values = {name: getattr(d, name) for name in shared}
    values.update(
        eval_path=d.eval_path or None,
        eval_split=d.eval_split or None,
        max_prompt_length=d.max_prompt_length or None,
        bucket_lengths=tuple(d.bucket_lengths) if d.bucket_lengths else None,
        cache_dir=d.cache_dir or str(Path(cfg.train.output_dir) / "data_cache"),
        max_records=d.max_records or None,
        seed=cfg.train.seed,
        show_progress=show_progress,
    )
    try:
        return DataConfig(**values)
    except ValueError as err:
        msg = str(err)
        if msg.startswith("DataConfig."):
            msg = "data." + msg[len("DataConfig."):]
        raise ConfigError(msg) from None


def build(cfg: Config, tokenizer, *, show_progress: bool = True):
    """``PreferenceData`` (train/eval examples, report, pad id, buckets) for ``cfg``."""
    return build_preference_data(data_config(cfg, show_progress=show_progress), tokenizer)
