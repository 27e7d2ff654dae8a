"""The batch contract (docs/ARCHITECTURE.md): ``PreferenceBatch`` and ``make_batch``.

A batch of B pairs has 2B rows: rows 0..B-1 are prompt+chosen, rows B..2B-1 are
prompt+rejected, right-padded with ``pad_id`` to one of a small set of bucket lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from poet_jax.data.tokenize import Example


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceBatch:
    """B preference pairs as numpy arrays.

    ``input_ids`` / ``attention_mask`` / ``response_mask``: int32 [2B, L] (chosen rows,
    then rejected rows; right padding). ``pair_valid``: int32 [B], 0 for filler pairs.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray
    pair_valid: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.pair_valid.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def stacked(self) -> dict[str, np.ndarray]:
        """The row arrays as [2, B, L] (axis 0: chosen, rejected) plus ``pair_valid`` [B].

        Useful for assembling a global batch from per-process shards along the pair axis
        (concatenating [2B_local, L] shards would interleave chosen and rejected rows).
        """
        b = self.num_pairs
        out = {k: v.reshape(2, b, -1) for k, v in self.as_dict().items() if k != "pair_valid"}
        out["pair_valid"] = self.pair_valid
        return out


def default_bucket_lengths(max_length: int, min_bucket: int = 64, multiple: int | None = None) -> tuple[int, ...]:
    """Bucket lengths covering ``max_length``.

    ``multiple=None``: powers of two from ``min_bucket`` below ``max_length``, then
    ``max_length`` itself (2048 -> 64, 128, ..., 2048). ``multiple=m``: m, 2m, ... up to
    the first multiple >= max_length.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if multiple is not None:
        if multiple < 1:
            raise ValueError(f"bucket multiple must be positive, got {multiple}")
        n = -(-max_length // multiple)
        return tuple(multiple * i for i in range(1, n + 1))
    out = []
    b = min_bucket
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def choose_bucket(length: int, bucket_lengths: Sequence[int]) -> int:
    """Smallest bucket >= ``length``; ValueError if ``length`` exceeds every bucket."""
    for b in sorted(bucket_lengths):
        if b >= length:
            return int(b)
    raise ValueError(
        f"a row of {length} tokens is longer than the largest bucket length {max(bucket_lengths)}; "
        "raise the largest bucket_lengths entry or lower max_length"
    )


def make_batch(
    examples: Sequence[Example],
    indices: Sequence[int],
    bucket_lengths: Sequence[int] | None,
    pad_id: int,
    *,
    length: int | None = None,
    valid: Sequence[int] | None = None,
) -> PreferenceBatch:
    """Build a PreferenceBatch from ``examples[i] for i in indices``.

    An index of -1 is a filler pair: a copy of the first real pair of the batch (so every
    row has response tokens) with ``pair_valid = 0``. ``length``, if given, is the row
    length to pad to (e.g. chosen from the whole global batch); otherwise the smallest
    bucket fitting the longest row (``bucket_lengths=None``: exactly the longest row).
    ``valid`` (optional, [B] of 0/1) marks further filler pairs (``pair_valid = 0``)
    whose index is a real example, as samplers produce them.
    """
    idx = np.asarray(indices, np.int64)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError("indices must be a non-empty 1-D sequence")
    real = idx[idx >= 0]
    filler = int(real[0]) if real.size else 0
    if not len(examples):
        raise ValueError("no examples to batch")
    exs = [examples[int(i) if i >= 0 else filler] for i in idx]
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in exs)
    if length is None:
        length = choose_bucket(longest, bucket_lengths) if bucket_lengths else longest
    elif longest > length:
        raise ValueError(f"a row of {longest} tokens does not fit the requested length {length}")
    b = len(exs)
    ids = np.full((2 * b, length), pad_id, np.int32)
    att = np.zeros((2 * b, length), np.int32)
    resp = np.zeros((2 * b, length), np.int32)
    for j, e in enumerate(exs):
        p = len(e.prompt_ids)
        for row, r in ((j, e.chosen_ids), (b + j, e.rejected_ids)):
            n = p + len(r)
            ids[row, :p] = e.prompt_ids
            ids[row, p:n] = r
            att[row, :n] = 1
            resp[row, p:n] = 1
    pair_valid = (idx >= 0).astype(np.int32)
    if valid is not None:
        v = np.asarray(valid, np.int32)
        if v.shape != pair_valid.shape:
            raise ValueError(f"valid has shape {v.shape}, expected {pair_valid.shape}")
        pair_valid = pair_valid * (v != 0)
    return PreferenceBatch(ids, att, resp, pair_valid.astype(np.int32))
