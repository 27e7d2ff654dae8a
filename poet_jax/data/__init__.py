"""Preference data: records -> Conversation -> Example -> PreferenceBatch, and samplers.

Typical use (the trainer)::

    data = build_preference_data(DataConfig(path=..., use_poet=True), tokenizer)
    sampler = data.train_sampler(global_batch_size=128, process_index=i, process_count=n)
    sampler.load_state_dict(saved)          # when resuming
    batch = sampler.next_batch(data.train_examples, data.pad_id)   # PreferenceBatch
    state = sampler.state_dict()            # save with the checkpoint
"""

from poet_jax.data.batch import PreferenceBatch, choose_bucket, default_bucket_lengths, make_batch
from poet_jax.data.errors import REASONS, DataError, DataReport
from poet_jax.data.formats import FORMATS, Conversation, detect_record_format, to_conversation
from poet_jax.data.pipeline import (
    DataConfig, PreferenceData, build_preference_data, load_pairs, split_eval,
)
from poet_jax.data.sampler import (
    BatchPlan, BatchSampler, batch_from_plan, eval_batches, eval_plans, row_lengths,
)
from poet_jax.data.sources import RecordSource, open_source
from poet_jax.data.tokenize import Example, TokenizerInfo, tokenize_conversation
from poet_jax.data.truncate import (
    poet_lengths, poet_truncate_example, truncate_example, truncation_lengths,
)

__all__ = [
    "REASONS", "FORMATS", "BatchPlan", "BatchSampler", "Conversation", "DataConfig", "DataError",
    "DataReport", "Example", "PreferenceBatch", "PreferenceData", "RecordSource", "TokenizerInfo",
    "batch_from_plan", "build_preference_data", "choose_bucket", "default_bucket_lengths",
    "detect_record_format", "eval_batches", "eval_plans", "load_pairs", "make_batch", "open_source",
    "poet_lengths", "poet_truncate_example", "row_lengths", "split_eval", "to_conversation",
    "tokenize_conversation", "truncate_example", "truncation_lengths",
]
