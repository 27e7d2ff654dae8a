"""Shared-prompt rows and padding-free packing of preference pairs (numpy, host side).

Two optimisations of the two-row layout of :mod:`poet_jax.data.batch` (``[prompt+chosen]``
and ``[prompt+rejected]``, each right-padded to a bucket):

* **shared prompt** (``shared_prompt=True``): one sequence per pair laid out as
  ``[prompt | chosen | rejected]``. Chosen tokens attend to the prompt and earlier
  chosen tokens; rejected tokens attend to the prompt and earlier rejected tokens, never
  to chosen ones. Rejected positions continue from the prompt end, so every token has the
  position (and therefore the log-prob) it has in the two-row layout. The prompt is
  computed once.
* **packing**: several pairs per row (each pair as one shared-prompt sequence, or as two
  sequences ``[prompt+chosen] [prompt+rejected]`` when ``shared_prompt=False``), with
  per-token segment ids so that no token attends across sequences, and positions
  restarting at 0 for every sequence. At most ``max_pairs_per_row`` pairs per row, so the
  per-pair sums come back with a fixed shape ``[rows * max_pairs_per_row]``.

The attention rule the model applies (``poet_jax.models.transformer.segment_attention_mask``
plus row causality): query ``q`` may attend key ``k`` iff ``k <= q`` (row slots),
``segment_ids[k] == segment_ids[q]`` and (``branch_ids[k] == 0`` or
``branch_ids[k] == branch_ids[q]``). Branch 0 = prompt, 1 = chosen, 2 = rejected.

Targets are aligned with **logits positions**: ``chosen_targets[r, t]`` is the chosen
token predicted by the logits at slot ``t`` (``chosen_mask[r, t] = 1``). In the
shared layout the last prompt slot predicts both the first chosen and the first rejected
token, hence the separate chosen / rejected arrays. ``pair_slot[r, t]`` is the pair
(``0..max_pairs_per_row-1``) that a scored target at slot ``t`` belongs to; the per-pair
sum in the trainer is a ``segment_sum`` over ``r * max_pairs_per_row + pair_slot``.

Build rows with :func:`pack_pairs` (first-fit, fixed number of rows: a sampler's global
batch) or :func:`pack_epoch` (first-fit over an epoch, a varying number of pairs per
step), then :func:`make_packed_batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from poet_jax.data.batch import choose_bucket
from poet_jax.data.tokenize import Example

__all__ = [
    "BRANCH_PROMPT",
    "BRANCH_CHOSEN",
    "BRANCH_REJECTED",
    "PackedBatch",
    "PackingError",
    "pair_tokens",
    "first_fit",
    "pack_pairs",
    "row_fill",
    "pack_epoch",
    "make_packed_batch",
]

BRANCH_PROMPT, BRANCH_CHOSEN, BRANCH_REJECTED = 0, 1, 2


class PackingError(ValueError):
    """A pair does not fit a packed row, or the requested packing is impossible."""


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch:
    """Packed preference pairs: ``R`` rows of ``L`` slots, at most ``M`` pairs per row.

    Row arrays, int32 ``[R, L]``: ``input_ids`` (``pad_id`` on padding), ``positions``
    (restart at 0 per sequence; rejected tokens of a shared-prompt sequence continue from
    the prompt end), ``segment_ids`` (1, 2, ... per sequence in the row; 0 = padding),
    ``branch_ids`` (0 prompt / padding, 1 chosen, 2 rejected), ``chosen_targets`` /
    ``rejected_targets`` (token predicted by the logits at this slot, ``-1`` where none),
    ``chosen_mask`` / ``rejected_mask`` (1 where that target is scored), ``pair_slot``
    (pair ``0..M-1`` of the token at this slot, ``-1`` on padding).

    Pair arrays, int32 ``[R, M]``: ``pair_valid`` (1 for a real pair), ``example_index``
    (index into the example list, ``-1`` for an empty slot). ``shared_prompt``: layout.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    branch_ids: np.ndarray
    chosen_targets: np.ndarray
    chosen_mask: np.ndarray
    rejected_targets: np.ndarray
    rejected_mask: np.ndarray
    pair_slot: np.ndarray
    pair_valid: np.ndarray
    example_index: np.ndarray
    shared_prompt: bool = True

    ARRAY_FIELDS = (
        "input_ids", "positions", "segment_ids", "branch_ids", "chosen_targets", "chosen_mask",
        "rejected_targets", "rejected_mask", "pair_slot", "pair_valid",
    )

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def max_pairs_per_row(self) -> int:
        return int(self.pair_valid.shape[1])

    @property
    def num_pairs(self) -> int:
        """Pair slots (``R * M``): the fixed length of the per-pair outputs."""
        return int(self.pair_valid.size)

    @property
    def num_real_tokens(self) -> int:
        """Slots holding a token (not padding): the tokens a forward pass really processes."""
        return int((self.segment_ids > 0).sum())

    def as_dict(self) -> dict[str, np.ndarray]:
        """The device arrays (everything but ``example_index`` / ``shared_prompt``)."""
        return {k: getattr(self, k) for k in self.ARRAY_FIELDS}


def pair_tokens(example: Example, shared_prompt: bool) -> int:
    """Row slots one pair occupies: ``P + Nc + Nr`` shared, ``2P + Nc + Nr`` otherwise."""
    p, c, r = len(example.prompt_ids), len(example.chosen_ids), len(example.rejected_ids)
    return p + c + r if shared_prompt else 2 * p + c + r


def _check_sizes(lengths: np.ndarray, row_length: int, max_pairs_per_row: int, indices) -> None:
    if row_length < 1:
        raise PackingError(f"row_length must be positive, got {row_length}")
    if max_pairs_per_row < 1:
        raise PackingError(f"max_pairs_per_row must be positive, got {max_pairs_per_row}")
    too_long = np.nonzero(lengths > row_length)[0]
    if too_long.size:
        j = int(too_long[0])
        raise PackingError(
            f"example {int(indices[j])} needs {int(lengths[j])} row slots, more than row_length={row_length}; "
            "raise row_length (or lower max_length so truncation shortens the pair)"
        )


def first_fit(
    lengths: Sequence[int], row_length: int, max_pairs_per_row: int, *, max_open_rows: int | None = None
) -> list[list[int]]:
    """First-fit bin packing of items (in the given order) into rows.

    Args:
      lengths: slots each item needs (each ``<= row_length``).
      row_length: slots per row. max_pairs_per_row: items per row at most.
      max_open_rows: ``None`` keeps every row open (classic first fit, O(N * rows)); an
        int keeps at most that many rows open, closing the fullest when exceeded (linear
        time over an epoch; the order of items stays roughly the given order).

    Returns:
      rows as lists of item positions (``0..N-1``), in the order the rows were opened.
    """
    lengths = np.asarray(lengths, np.int64)
    _check_sizes(lengths, row_length, max_pairs_per_row, np.arange(lengths.size))
    open_rows: list[list[int]] = []
    free: list[int] = []
    order: list[int] = []  # creation number of each open row, to return rows in opening order
    created = 0
    done: list[tuple[int, list[int]]] = []
    for i, n in enumerate(lengths.tolist()):
        for j, f in enumerate(free):
            if f >= n and len(open_rows[j]) < max_pairs_per_row:
                open_rows[j].append(i)
                free[j] -= n
                if len(open_rows[j]) == max_pairs_per_row or free[j] == 0:
                    done.append((order.pop(j), open_rows.pop(j)))
                    free.pop(j)
                break
        else:
            open_rows.append([i])
            free.append(row_length - n)
            order.append(created)
            created += 1
            if max_pairs_per_row == 1 or free[-1] == 0:
                done.append((order.pop(), open_rows.pop()))
                free.pop()
            elif max_open_rows is not None and len(open_rows) > max_open_rows:
                j = int(np.argmin(free))
                done.append((order.pop(j), open_rows.pop(j)))
                free.pop(j)
    done.extend(zip(order, open_rows))
    done.sort(key=lambda x: x[0])
    return [r for _, r in done]


def pack_pairs(
    examples: Sequence[Example],
    indices: Sequence[int],
    *,
    num_rows: int | None,
    row_length: int,
    max_pairs_per_row: int,
    shared_prompt: bool = True,
    row_multiple: int = 1,
    balance: bool = False,
) -> np.ndarray:
    """Pack the given pairs (e.g. one sampler batch) into exactly ``num_rows`` rows.

    First-fit decreasing (longest pairs first). Returns ``[num_rows, max_pairs_per_row]``
    int64 example indices, ``-1`` for empty slots. ``num_rows=None``: as many rows as
    first fit needs, rounded up to a multiple of ``row_multiple`` (e.g. the data-parallel
    device count, or 4 to bound the number of compiled shapes). ``balance``: spread the
    pairs over those rows so the fullest row is as short as the longest-first greedy rule
    makes it (each pair to the emptiest row), which lets the caller cut every row to that
    length (:func:`row_fill`). Raises :class:`PackingError` if the pairs do not fit.
    Negative entries of ``indices`` (filler pairs) are skipped.
    """
    idx = np.asarray([int(i) for i in indices if int(i) >= 0], np.int64)
    lengths = np.asarray([pair_tokens(examples[i], shared_prompt) for i in idx], np.int64)
    _check_sizes(lengths, row_length, max_pairs_per_row, idx)
    order = np.argsort(-lengths, kind="stable")
    rows = first_fit(lengths[order], row_length, max_pairs_per_row)
    if num_rows is None:
        if row_multiple < 1:
            raise PackingError(f"row_multiple must be positive, got {row_multiple}")
        num_rows = max(-(-len(rows) // row_multiple) * row_multiple, 1)
    if balance and 1 < num_rows and len(rows) <= num_rows:
        rows = _balance(lengths[order], rows, max_pairs_per_row, num_rows)
    if len(rows) > num_rows:
        raise PackingError(
            f"{idx.size} pairs ({int(lengths.sum())} tokens) need {len(rows)} rows of {row_length} slots "
            f"(max {max_pairs_per_row} pairs per row), but num_rows={num_rows}"
        )
    plan = np.full((num_rows, max_pairs_per_row), -1, np.int64)
    for r, row in enumerate(rows):
        plan[r, : len(row)] = idx[order[row]]
    return plan


def _balance(lengths: np.ndarray, rows: list[list[int]], max_pairs_per_row: int, n: int) -> list[list[int]]:
    """Longest-first items (``lengths`` in decreasing order) over ``n >= len(rows)`` rows (e.g. the
    rows padded up to a multiple of the data-parallel ways), each to the emptiest row with a free
    pair slot; keeps ``rows`` (first fit) when that does not shorten the fullest row."""
    fill = np.zeros(n, np.int64)
    out: list[list[int]] = [[] for _ in range(n)]
    for i, size in enumerate(lengths.tolist()):
        free = [j for j in range(n) if len(out[j]) < max_pairs_per_row]
        j = min(free, key=lambda r: (fill[r], r))
        out[j].append(i)
        fill[j] += size
    first_fit_max = max(int(lengths[r].sum()) for r in rows)
    return [r for r in out if r] if int(fill.max()) < first_fit_max else rows


def row_fill(examples: Sequence[Example], plan: np.ndarray, shared_prompt: bool = True) -> int:
    """Slots used by the fullest row of a plan (``[R, M]`` example indices, ``-1`` empty)."""
    fills = [sum(pair_tokens(examples[int(i)], shared_prompt) for i in row if i >= 0) for row in np.asarray(plan)]
    return max(fills, default=0)


def pack_epoch(
    examples: Sequence[Example],
    order: Sequence[int],
    *,
    rows_per_batch: int,
    row_length: int,
    max_pairs_per_row: int,
    shared_prompt: bool = True,
    max_open_rows: int | None = 64,
) -> list[np.ndarray]:
    """First-fit an epoch's pairs (in ``order``, e.g. a shuffled permutation) into batches.

    Returns a list of ``[rows_per_batch, max_pairs_per_row]`` plans (example indices,
    ``-1`` empty); the last plan is completed with empty rows. The number of pairs per
    batch varies (losses normalise by the valid-pair count). Deterministic in ``order``.
    """
    idx = np.asarray(order, np.int64)
    lengths = np.asarray([pair_tokens(examples[i], shared_prompt) for i in idx], np.int64)
    _check_sizes(lengths, row_length, max_pairs_per_row, idx)
    if rows_per_batch < 1:
        raise PackingError(f"rows_per_batch must be positive, got {rows_per_batch}")
    rows = first_fit(lengths, row_length, max_pairs_per_row, max_open_rows=max_open_rows)
    plans = []
    for start in range(0, len(rows), rows_per_batch):
        plan = np.full((rows_per_batch, max_pairs_per_row), -1, np.int64)
        for r, row in enumerate(rows[start : start + rows_per_batch]):
            plan[r, : len(row)] = idx[row]
        plans.append(plan)
    return plans


def make_packed_batch(
    examples: Sequence[Example],
    plan: np.ndarray,
    pad_id: int,
    *,
    row_length: int | None = None,
    bucket_lengths: Sequence[int] | None = None,
    shared_prompt: bool = True,
) -> PackedBatch:
    """Materialise a plan ``[R, M]`` (example indices, ``-1`` empty) as a :class:`PackedBatch`.

    The row length is ``row_length`` if given, else the smallest of ``bucket_lengths``
    fitting the fullest row (``None``: exactly the fullest row). Every pair in the plan
    must use the layout ``shared_prompt`` that the plan was packed for.
    """
    plan = np.asarray(plan, np.int64)
    if plan.ndim != 2 or plan.shape[0] < 1 or plan.shape[1] < 1:
        raise PackingError(f"plan must be a non-empty [rows, max_pairs_per_row] array, got shape {plan.shape}")
    R, M = plan.shape
    used = [sum(pair_tokens(examples[int(i)], shared_prompt) for i in row if i >= 0) for row in plan]
    fullest = max(max(used), 1)
    if row_length is None:
        row_length = choose_bucket(fullest, bucket_lengths) if bucket_lengths else fullest
    elif fullest > row_length:
        raise PackingError(f"a packed row needs {fullest} slots, more than row_length={row_length}")
    L = int(row_length)
    z = lambda fill=0: np.full((R, L), fill, np.int32)  # noqa: E731
    ids, pos, seg, br = z(pad_id), z(), z(), z()
    ct, cm, rt, rm, slot = z(-1), z(), z(-1), z(), z(-1)
    valid = (plan >= 0).astype(np.int32)
    for r in range(R):
        cur, nseg = 0, 0
        for m in range(M):
            i = int(plan[r, m])
            if i < 0:
                continue
            e = examples[i]
            p = np.asarray(e.prompt_ids, np.int32)
            c = np.asarray(e.chosen_ids, np.int32)
            j = np.asarray(e.rejected_ids, np.int32)
            P, C, J = len(p), len(c), len(j)
            if P < 1:
                raise PackingError(f"example {i} has an empty prompt; its first response token has no predictor")
            if shared_prompt:
                nseg += 1
                s = slice(cur, cur + P + C + J)
                ids[r, s] = np.concatenate([p, c, j])
                pos[r, s] = np.concatenate([np.arange(P + C), P + np.arange(J)])
                seg[r, s] = nseg
                br[r, s] = np.concatenate([np.zeros(P), np.full(C, BRANCH_CHOSEN), np.full(J, BRANCH_REJECTED)])
                slot[r, s] = m
                # logits at slot t predict the next token of the same branch
                c_pred = cur + P - 1 + np.arange(C)  # last prompt slot, then chosen slots
                j_pred = cur + np.concatenate([[P - 1], P + C + np.arange(J - 1)]).astype(np.int64)[:J]
                ct[r, c_pred], cm[r, c_pred] = c, 1
                rt[r, j_pred], rm[r, j_pred] = j, 1
                cur += P + C + J
            else:
                for resp, tgt, msk, branch in ((c, ct, cm, BRANCH_CHOSEN), (j, rt, rm, BRANCH_REJECTED)):
                    nseg += 1
                    n = P + len(resp)
                    s = slice(cur, cur + n)
                    ids[r, s] = np.concatenate([p, resp])
                    pos[r, s] = np.arange(n)
                    seg[r, s] = nseg
                    br[r, cur + P : cur + n] = branch
                    slot[r, s] = m
                    pred = cur + P - 1 + np.arange(len(resp))
                    tgt[r, pred], msk[r, pred] = resp, 1
                    cur += n
    return PackedBatch(ids, pos, seg, br, ct, cm, rt, rm, slot, valid, plan.copy(), bool(shared_prompt))

