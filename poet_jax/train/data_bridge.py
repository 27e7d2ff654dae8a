"""Config ``data`` section -> :class:`poet_jax.data.DataConfig` -> tokenized examples."""

from __future__ import annotations

from pathlib import Path

from poet_jax.data import DataConfig, build_preference_data

from .config import Config, ConfigError


def data_config(cfg: Config, *, show_progress: bool = True) -> DataConfig:
    """The data pipeline's DataConfig for ``cfg`` (its ValueErrors become ConfigError naming data.<key>)."""
    d = cfg.data
    try:
        return DataConfig(
            path=d.path,
            format=d.format,
            split=d.split,
            eval_path=d.eval_path or None,
            eval_split=d.eval_split or None,
            eval_fraction=d.eval_fraction,
            seed=cfg.train.seed,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length or None,
            truncation=d.truncation,
            use_poet=d.use_poet,
            poet_rule=d.poet_rule,
            poet_ratio=d.poet_ratio,
            poet_on_eval=d.poet_on_eval,
            chat_template=d.chat_template,
            bucket_lengths=tuple(d.bucket_lengths) if d.bucket_lengths else None,
            group_by_length=d.group_by_length,
            on_bad_record=d.on_bad_record,
            cache_dir=d.cache_dir or str(Path(cfg.train.output_dir) / "data_cache"),
            max_records=d.max_records or None,
            show_progress=show_progress,
        )
    except ValueError as err:
        msg = str(err)
        if msg.startswith("DataConfig."):
            msg = "data." + msg[len("DataConfig."):]
        raise ConfigError(msg) from None


def build(cfg: Config, tokenizer, *, show_progress: bool = True):
    """``PreferenceData`` (train/eval examples, report, pad id, buckets) for ``cfg``."""
    return build_preference_data(data_config(cfg, show_progress=show_progress), tokenizer)
