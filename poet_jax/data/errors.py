"""Errors and the accounting report of the data pipeline.

Every record that does not become a training pair is either the cause of a
:class:`DataError` (``on_bad_record="error"``) or counted in a :class:`DataReport`
under its reason (``on_bad_record="skip"``). Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

logger = logging.getLogger("poet_jax.data")

# Reasons a record can be rejected (keys of DataReport.skipped).
REASONS = {
    "malformed_json": "the record is not valid JSON",
    "non_utf8": "the record contains bytes that are not valid UTF-8",
    "not_an_object": "the record is not a JSON object / mapping",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "bad_message": "a chat message is malformed (role/content)",
    "bad_role_order": "the roles are in an order the format does not allow",
    "bad_transcript": "an HH-RLHF transcript cannot be parsed",
    "empty_prompt": "the prompt is empty",
    "empty_response": "the chosen or rejected response is empty",
    "identical_responses": "chosen and rejected are identical",
    "prompt_mismatch": "chosen and rejected do not share the same prompt",
    "no_room_for_response": "after max_length/max_prompt_length truncation no response token fits",
    "template_error": "the chat template failed to render the conversation",
}


class DataError(ValueError):
    """A problem in the input data, naming the file, the record and the reason.

    Attributes: ``source`` (file path or data-set name), ``record`` (0-based record
    number, or None for whole-file problems), ``reason`` (a key of ``REASONS`` or
    ``"file"``), ``detail`` (human-readable explanation).
    """

    def __init__(self, source: str, record: int | None, reason: str, detail: str, line: int | None = None):
        self.source = str(source)
        self.record = record
        self.reason = reason
        self.detail = detail
        self.line = line
        where = self.source
        if record is not None:
            where += f", record {record} (0-based)"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {reason}: {detail}")


@dataclasses.dataclass
class DataReport:
    """Counts of what happened to every record read.

    ``records_read``: records found in the sources. ``pairs_kept``: records that became
    examples (train + eval). ``skipped``: reason -> count of records dropped (skip mode).
    ``examples``: reason -> up to 3 example messages per skipped reason.
    ``prompt_truncated`` / ``response_truncated``: pairs shortened by the max_length
    rules (kept). ``prefix_mismatch``: pairs whose tokenized prompt was not a prefix of
    the tokenized prompt+response (the common prefix was used, as TRL does).
    ``poet_tokens_removed`` / ``response_tokens_before_poet``: POET bookkeeping.
    """

    records_read: int = 0
    pairs_kept: int = 0
    train_pairs: int = 0
    eval_pairs: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    prompt_truncated: int = 0
    response_truncated: int = 0
    prefix_mismatch: int = 0
    eos_appended: int = 0
    response_tokens_before_poet: int = 0
    poet_tokens_removed: int = 0
    from_cache: bool = False  # True if any source was loaded from the tokenization cache

    @property
    def total_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def add_skip(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < 3:
            ex.append(str(err))

    def merge(self, other: "DataReport") -> None:
        """Add ``other``'s counts into this report (in place)."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, bool):
                setattr(self, f.name, a or b)
            elif isinstance(a, int):
                setattr(self, f.name, a + b)
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(v[: max(0, 3 - len(mine))])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = dict(self.skipped)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataReport":
        d = dict(d)
        d["skipped"] = Counter(d.get("skipped", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        lines = [
            f"records read {self.records_read}, pairs kept {self.pairs_kept} "
            f"(train {self.train_pairs}, eval {self.eval_pairs}), skipped {self.total_skipped}"
        ]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n:6d}  {reason}: {REASONS.get(reason, reason)}")
            for msg in self.examples.get(reason, [])[:1]:
                lines.append(f"           e.g. {msg}")
        lines.append(
            f"  truncated: prompt {self.prompt_truncated}, response {self.response_truncated}; "
            f"prompt/response token boundary mismatches {self.prefix_mismatch}; EOS appended {self.eos_appended}"
        )
        if self.response_tokens_before_poet:
            frac = self.poet_tokens_removed / self.response_tokens_before_poet
            lines.append(f"  POET removed {self.poet_tokens_removed} response tokens ({frac:.1%})")
        if self.from_cache:
            lines.append("  (tokenized data loaded from cache)")
        return "\n".join(lines)

    def log(self) -> None:
        logger.info("preference data: %s", self.summary())
        if self.total_skipped:
            logger.warning(
                "skipped %d bad records: %s", self.total_skipped, dict(sorted(self.skipped.items()))
            )
