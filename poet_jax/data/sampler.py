"""Deterministic, resumable, process-sharded batch sampling.

The sampler works on the GLOBAL batch: every process computes the same epoch order
from ``(seed, epoch)``, picks the global batch's bucket length from all of its pairs,
and then takes its own contiguous slice of ``global_batch_size / process_count`` pairs.
Process p of P therefore sees pairs ``[p*B/P, (p+1)*B/P)`` of each global batch, and the
union over processes is exactly what one process with ``process_count=1`` sees.

Its position is a small dict of ints (``state_dict()``), saved in checkpoints;
``load_state_dict`` continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from poet_jax.data.batch import PreferenceBatch, choose_bucket, make_batch
from poet_jax.data.tokenize import Example


@dataclasses.dataclass(frozen=True, eq=False)
class BatchPlan:
    """One process's share of one global batch.

    ``indices`` int64 [B_local] (example indices), ``valid`` int32 [B_local] (0: filler pair
    repeating a real pair of the same global batch), ``length``: the global batch's row
    length (bucket), ``epoch`` / ``step``: position of this batch.
    """

    indices: np.ndarray
    valid: np.ndarray
    length: int
    epoch: int
    step: int


def row_lengths(examples: Sequence[Example]) -> np.ndarray:
    """int64 [N]: per pair, the longer of its two rows (prompt + response)."""
    return np.asarray(
        [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples], np.int64
    )


def batch_from_plan(examples: Sequence[Example], plan: BatchPlan, pad_id: int) -> PreferenceBatch:
    return make_batch(examples, plan.indices, None, pad_id, length=plan.length, valid=plan.valid)


def _local_plan(
    global_idx: np.ndarray, lengths: np.ndarray, bucket_lengths: Sequence[int] | None,
    process_index: int, process_count: int, epoch: int, step: int,
) -> BatchPlan:
    real = global_idx[global_idx >= 0]
    longest = int(lengths[real].max())
    length = choose_bucket(longest, bucket_lengths) if bucket_lengths else longest
    valid = (global_idx >= 0).astype(np.int32)
    filled = np.where(global_idx >= 0, global_idx, real[0])
    per = len(global_idx) // process_count
    sl = slice(process_index * per, (process_index + 1) * per)
    return BatchPlan(filled[sl].copy(), valid[sl].copy(), length, epoch, step)


def _check_procs(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
        )


class BatchSampler:
    """Infinite iterator of :class:`BatchPlan` over epochs.

    Args:
      lengths: int [N] row lengths (``row_lengths(examples)``), identical on every process.
      global_batch_size: pairs per global batch (all processes together).
      bucket_lengths: allowed row lengths (None: pad to the longest row of the batch).
      seed: the shuffle seed; the order of epoch e depends only on (seed, e).
      process_index, process_count: this process's slice of every global batch.
      shuffle: permute the pairs each epoch.
      group_by_length: sort pairs by length inside mega-batches of
        ``megabatch_size`` global batches, then shuffle the batch order (less padding).
      drop_last: drop the incomplete last global batch of an epoch (else fill it with
        filler pairs, ``pair_valid=0``).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch_size: int,
        *,
        bucket_lengths: Sequence[int] | None = None,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        group_by_length: bool = False,
        drop_last: bool = True,
        megabatch_size: int = 32,
    ):
        _check_procs(global_batch_size, process_index, process_count)
        self.lengths = np.asarray(lengths, np.int64)
        self.num_pairs = int(self.lengths.shape[0])
        self.global_batch_size = int(global_batch_size)
        self.bucket_lengths = tuple(bucket_lengths) if bucket_lengths else None
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.shuffle, self.group_by_length, self.drop_last = shuffle, group_by_length, drop_last
        self.megabatch_size = int(megabatch_size)
        if self.drop_last:
            self.steps_per_epoch = self.num_pairs // self.global_batch_size
        else:
            self.steps_per_epoch = -(-self.num_pairs // self.global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_pairs} pairs do not make one global batch of {self.global_batch_size} "
                "(drop_last=True); lower the batch size or add data"
            )
        if self.bucket_lengths and self.lengths.size and self.lengths.max() > max(self.bucket_lengths):
            raise ValueError(
                f"the longest pair ({int(self.lengths.max())} tokens) exceeds the largest bucket "
                f"{max(self.bucket_lengths)}"
            )
        self.epoch = 0
        self.step = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # -- order ------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """int64 [steps_per_epoch, global_batch_size] example indices of ``epoch`` (-1: filler)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, g = self.num_pairs, self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: self.steps_per_epoch * g]
        if self.group_by_length:
            mb = g * self.megabatch_size
            parts = []
            for s in range(0, len(order), mb):
                chunk = order[s : s + mb]
                parts.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
            order = np.concatenate(parts)
        pad = self.steps_per_epoch * g - len(order)
        order = np.concatenate([order, -np.ones(pad, np.int64)])
        batches = order.reshape(self.steps_per_epoch, g)
        if self.group_by_length and self.shuffle:
            batches = batches[rng.permutation(self.steps_per_epoch)]
        self._cache = (epoch, batches)
        return batches

    def plan(self, epoch: int, step: int) -> BatchPlan:
        """This process's share of global batch ``step`` of ``epoch`` (pure given the config)."""
        g = self.epoch_batches(epoch)[step]
        return _local_plan(g, self.lengths, self.bucket_lengths, self.process_index, self.process_count, epoch, step)

    # -- iteration / state -----------------------------------------------------------------
    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> BatchPlan:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        p = self.plan(self.epoch, self.step)
        self.step += 1
        return p

    def next_batch(self, examples: Sequence[Example], pad_id: int) -> PreferenceBatch:
        """The next PreferenceBatch of this process (advances the state)."""
        return batch_from_plan(examples, next(self), pad_id)

    def state_dict(self) -> dict[str, int]:
        """Position after the batches handed out so far (save it with the checkpoint)."""
        return {
            "epoch": int(self.epoch), "step": int(self.step), "seed": int(self.seed),
            "num_pairs": self.num_pairs, "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from ``state_dict()``); the next batch is the one after it."""
        for key in ("num_pairs", "global_batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "resuming needs the same data and global batch size"
                )
        missing = {"epoch", "step"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing {sorted(missing)}")
        if not 0 <= int(state["step"]) <= self.steps_per_epoch or int(state["epoch"]) < 0:
            raise ValueError(f"sampler state {state} is out of range (steps_per_epoch={self.steps_per_epoch})")
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._cache = None


def eval_plans(
    lengths: Sequence[int],
    global_batch_size: int,
    *,
    bucket_lengths: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    sort_by_length: bool = True,
) -> list[BatchPlan]:
    """Plans covering every pair exactly once; the last global batch is completed with
    filler pairs (``valid=0``). ``sort_by_length`` orders pairs longest first (less padding)."""
    _check_procs(global_batch_size, process_index, process_count)
    lengths = np.asarray(lengths, np.int64)
    n = lengths.shape[0]
    if n == 0:
        return []
    order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(n)
    steps = -(-n // global_batch_size)
    order = np.concatenate([order, -np.ones(steps * global_batch_size - n, np.int64)])
    return [
        _local_plan(g, lengths, bucket_lengths, process_index, process_count, 0, s)
        for s, g in enumerate(order.reshape(steps, global_batch_size))
    ]


def eval_batches(
    examples: Sequence[Example],
    global_batch_size: int,
    pad_id: int,
    *,
    bucket_lengths: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    sort_by_length: bool = True,
) -> Iterator[PreferenceBatch]:
    """This process's eval batches: every pair exactly once over all processes."""
    for plan in eval_plans(
        row_lengths(examples), global_batch_size, bucket_lengths=bucket_lengths,
        process_index=process_index, process_count=process_count, sort_by_length=sort_by_length,
    ):
        yield batch_from_plan(examples, plan, pad_id)
