"""The entry point the trainer calls: ``build_preference_data(DataConfig, tokenizer)``.

records -> Conversation -> Example (cached) -> eval split -> max_length truncation
-> POET (train; eval too if ``poet_on_eval``) -> PreferenceData.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poet_jax.data.batch import PreferenceBatch, default_bucket_lengths
from poet_jax.data.errors import DataError, DataReport
from poet_jax.data.formats import FORMATS, detect_record_format, to_conversation
from poet_jax.data.sampler import BatchSampler, eval_batches, row_lengths
from poet_jax.data.sources import open_source
from poet_jax.data.tokenize import (
    TOKENIZATION_VERSION, Example, TokenizerInfo, load_examples, save_examples, tokenize_conversations,
)
from poet_jax.data.truncate import TRUNCATION_MODES, poet_truncate_example, truncate_example

logger = logging.getLogger("poet_jax.data")

# losses.poet_keep_lengths rules, plus the names for the paper's two ablations.
POET_RULES = ("min", "own", "none", "fraction_of_k", "fraction_of_own")


@dataclasses.dataclass
class DataConfig:
    """Preference data settings (embedded in the trainer's config).

    path: JSON / JSONL(.gz) / Parquet file, a ``save_to_disk`` folder, or a Hub name.
    format: "auto" or one of formats.FORMATS. split: split of a folder / Hub data set.
    eval_path / eval_split: a separate eval source (file, or another split of ``path``);
    otherwise ``eval_fraction`` of the records of ``path`` (chosen by ``seed``) is held out.
    max_length / max_prompt_length / truncation: see truncate.truncation_lengths.
    use_poet / poet_rule / poet_ratio: POET on token ids (losses.poet_keep_lengths:
    "min" keeps ceil(ratio*k) of both, k = min length; "own" keeps ceil(ratio*n) of each;
    aliases "fraction_of_k" -> "min", "fraction_of_own" -> "own");
    poet_on_eval: also cut eval pairs (default False: eval keeps full responses so the
    mask-level POET metrics and the M_k diagnostics can both be computed).
    chat_template: render with the tokenizer's chat template (False: plain text + EOS).
    bucket_lengths: allowed row lengths (None: powers of two from 64 plus max_length;
    an empty tuple: no buckets, pad to the longest row of each batch).
    group_by_length: length-grouped sampling. on_bad_record: "error" | "skip".
    cache_dir: where tokenized data is cached (None: no cache).
    max_records: read at most this many records per source (None: all).
    """

    path: str = ""
    format: str = "auto"
    split: str = "train"
    eval_path: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0
    seed: int = 42
    max_length: int | None = 2048
    max_prompt_length: int | None = 1800
    truncation: str = "fit"
    use_poet: bool = False
    poet_rule: str = "min"
    poet_ratio: float = 1.0
    poet_on_eval: bool = False
    chat_template: bool = True
    bucket_lengths: tuple[int, ...] | None = None
    group_by_length: bool = False
    on_bad_record: str = "error"
    cache_dir: str | None = None
    max_records: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"DataConfig.{field}={getattr(self, field)!r}: {why}")

        if self.format != "auto" and self.format not in FORMATS:
            raise bad("format", f"expected 'auto' or one of {FORMATS}")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise bad("eval_fraction", "must be in [0, 1)")
        if self.eval_fraction and (self.eval_path or self.eval_split):
            raise bad("eval_fraction", "give either eval_path / eval_split or eval_fraction, not both")
        if self.max_length is not None and int(self.max_length) < 2:
            raise bad("max_length", "must be >= 2 or None")
        if self.max_prompt_length is not None:
            if int(self.max_prompt_length) < 1:
                raise bad("max_prompt_length", "must be >= 1 or None")
            if self.max_length is not None and self.max_prompt_length >= self.max_length:
                raise bad("max_prompt_length", f"must be < max_length={self.max_length} to leave room for responses")
        if self.truncation not in TRUNCATION_MODES:
            raise bad("truncation", f"expected one of {TRUNCATION_MODES}")
        self.poet_rule = {"fraction_of_k": "min", "fraction_of_own": "own"}.get(self.poet_rule, self.poet_rule)
        if self.poet_rule not in POET_RULES:
            raise bad("poet_rule", f"expected one of {POET_RULES}")
        if not 0.0 < float(self.poet_ratio) <= 1.0:
            raise bad("poet_ratio", "must be in (0, 1]")
        if self.on_bad_record not in ("error", "skip"):
            raise bad("on_bad_record", "expected 'error' or 'skip'")
        if self.bucket_lengths is not None:
            b = tuple(int(x) for x in self.bucket_lengths)
            if any(x < 1 for x in b):
                raise bad("bucket_lengths", "lengths must be positive")
            if b and self.max_length is not None and max(b) < self.max_length:
                raise bad("bucket_lengths", f"the largest bucket must be >= max_length={self.max_length}")
            self.bucket_lengths = tuple(sorted(set(b)))


@dataclasses.dataclass
class PreferenceData:
    """Tokenized, truncated pairs ready for batching.

    ``bucket_lengths``: the resolved buckets (None: no bucketing). ``pad_id``: padding id.
    """

    train_examples: list[Example]
    eval_examples: list[Example]
    report: DataReport
    pad_id: int
    bucket_lengths: tuple[int, ...] | None
    config: DataConfig

    def train_sampler(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1,
        drop_last: bool = True, seed: int | None = None, shuffle: bool = True,
    ) -> BatchSampler:
        """A resumable sampler over ``train_examples`` (config's seed and group_by_length)."""
        return BatchSampler(
            row_lengths(self.train_examples), global_batch_size, bucket_lengths=self.bucket_lengths,
            seed=self.config.seed if seed is None else seed, process_index=process_index,
            process_count=process_count, group_by_length=self.config.group_by_length, drop_last=drop_last,
            shuffle=shuffle,
        )

    def eval_batches(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[PreferenceBatch]:
        """Every eval pair exactly once (last batch completed with pair_valid=0 fillers)."""
        return eval_batches(
            self.eval_examples, global_batch_size, self.pad_id, bucket_lengths=self.bucket_lengths,
            process_index=process_index, process_count=process_count,
        )


def _cache_key(source_fp: str, fmt: str, cfg: DataConfig, tok_fp: str) -> str:
    blob = json.dumps(
        [TOKENIZATION_VERSION, source_fp, fmt, cfg.chat_template, cfg.on_bad_record, cfg.max_records, tok_fp]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_pairs(
    path: str, split: str, cfg: DataConfig, info: TokenizerInfo, cache_dir: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Read, convert, validate and tokenize one source (untruncated Examples), with cache."""
    src = open_source(path, split)
    report = DataReport()
    cache_file = None
    if cache_dir:
        key = _cache_key(src.fingerprint, cfg.format, cfg, info.fingerprint())
        cache_file = Path(cache_dir) / f"poet_jax_pairs_{key}.npz"
        if cache_file.is_file():
            try:
                examples, meta = load_examples(str(cache_file), src.name)
            except Exception as err:  # a damaged cache is rebuilt, not fatal
                logger.warning("ignoring unreadable cache %s: %s", cache_file, err)
            else:
                report = DataReport.from_dict(meta["report"])
                report.from_cache = True
                logger.info("loaded %d tokenized pairs of %s from %s", len(examples), src.name, cache_file)
                return examples, report

    def handle(err: DataError) -> None:
        if cfg.on_bad_record == "error":
            raise err
        report.add_skip(err)

    fmt = None if cfg.format == "auto" else cfg.format
    convs = []
    for rec_no, rec, line in src.records():
        if cfg.max_records is not None and rec_no >= cfg.max_records:
            break
        report.records_read += 1
        if isinstance(rec, DataError):
            handle(rec)
            continue
        if fmt is None:
            fmt = detect_record_format(rec)
            if fmt is None:
                if not isinstance(rec, dict):
                    handle(DataError(src.name, rec_no, "not_an_object", f"expected a JSON object, got {type(rec).__name__}", line))
                else:
                    handle(DataError(
                        src.name, rec_no, "missing_field",
                        f"cannot tell the data format: no 'chosen' or 'conversations' field (fields: {sorted(rec)}); "
                        "fix the record or set format=", line,
                    ))
                continue
            logger.info("%s: detected format %r", src.name, fmt)
        try:
            convs.append((src.name, rec_no, to_conversation(rec, fmt, src.name, rec_no, line)))
        except DataError as err:
            handle(err)
    if report.records_read == 0:
        raise DataError(src.name, None, "file", "no records found")
    examples, stats = tokenize_conversations(
        convs, info, cfg.chat_template, on_error=handle, progress=cfg.show_progress
    )
    if not examples:
        raise DataError(
            src.name, None, "file", f"every one of the {report.records_read} records was skipped: {dict(report.skipped)}"
        )
    report.prefix_mismatch += stats.prefix_mismatch
    report.eos_appended += stats.eos_appended
    if cache_file is not None:
        save_examples(str(cache_file), examples, {"report": report.to_dict(), "format": fmt, "source": src.name})
    return examples, report


def split_eval(examples: Sequence[Example], num_records: int, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``round(fraction * num_records)`` record numbers, chosen by ``seed``.

    The split is on record numbers (not on surviving pairs), so it does not change when
    the tokenizer, truncation or the set of skipped records change.
    """
    n_eval = int(round(fraction * num_records))
    if n_eval == 0:
        return list(examples), []
    held = set(np.random.default_rng(seed).permutation(num_records)[:n_eval].tolist())
    train = [e for e in examples if e.record not in held]
    ev = [e for e in examples if e.record in held]
    return train, ev


def _finish(
    examples: list[Example], cfg: DataConfig, report: DataReport, handle: Any, poet: bool
) -> list[Example]:
    out = []
    for ex in examples:
        t, pcut, rcut = truncate_example(ex, cfg.max_length, cfg.max_prompt_length, cfg.truncation)
        if len(t.chosen_ids) == 0 or len(t.rejected_ids) == 0:
            handle(DataError(
                ex.source, ex.record, "no_room_for_response",
                f"prompt of {len(ex.prompt_ids)} tokens leaves no room for a response within "
                f"max_length={cfg.max_length} (max_prompt_length={cfg.max_prompt_length})",
            ))
            continue
        report.prompt_truncated += int(pcut)
        report.response_truncated += int(rcut)
        if poet:
            before = len(t.chosen_ids) + len(t.rejected_ids)
            t = poet_truncate_example(t, cfg.poet_rule, cfg.poet_ratio)
            report.response_tokens_before_poet += before
            report.poet_tokens_removed += before - len(t.chosen_ids) - len(t.rejected_ids)
        out.append(t)
    return out


def build_preference_data(
    cfg: DataConfig, tokenizer: Any, *, cache_dir: str | os.PathLike | None = None
) -> PreferenceData:
    """Load, validate, tokenize, split, truncate (and POET-cut) preference data.

    ``tokenizer``: a Hugging Face tokenizer. ``cache_dir`` overrides ``cfg.cache_dir``.
    Raises DataError on the first bad record when ``cfg.on_bad_record == "error"``;
    otherwise bad records are counted in ``PreferenceData.report``.
    """
    if not cfg.path:
        raise ValueError("DataConfig.path is empty: give a data file, folder or Hub name")
    info = TokenizerInfo(tokenizer)
    cache = str(cache_dir) if cache_dir is not None else cfg.cache_dir
    report = DataReport()

    def handle(err: DataError) -> None:
        if cfg.on_bad_record == "error":
            raise err
        report.add_skip(err)

    train, rep = load_pairs(cfg.path, cfg.split, cfg, info, cache)
    report.merge(rep)
    if cfg.eval_path or cfg.eval_split:
        ev, rep = load_pairs(cfg.eval_path or cfg.path, cfg.eval_split or cfg.split, cfg, info, cache)
        report.merge(rep)
    elif cfg.eval_fraction > 0:
        train, ev = split_eval(train, rep.records_read, cfg.eval_fraction, cfg.seed)
    else:
        ev = []
    train = _finish(train, cfg, report, handle, cfg.use_poet)
    ev = _finish(ev, cfg, report, handle, cfg.use_poet and cfg.poet_on_eval)
    if not train:
        raise DataError(cfg.path, None, "file", "no training pairs left")
    report.train_pairs, report.eval_pairs = len(train), len(ev)
    report.pairs_kept = len(train) + len(ev)

    if cfg.bucket_lengths is None:
        longest = int(max(row_lengths(train).max(), row_lengths(ev).max() if ev else 0))
        top = cfg.max_length if cfg.max_length is not None else 1 << max(6, (longest - 1).bit_length())
        buckets: tuple[int, ...] | None = default_bucket_lengths(top)
    elif len(cfg.bucket_lengths) == 0:
        buckets = None
    else:
        buckets = tuple(cfg.bucket_lengths)
    report.log()
    return PreferenceData(train, ev, report, info.pad_id, buckets, cfg)
