"""The training loop: data -> jitted steps -> metrics / evaluation / checkpoints -> HF export.

``train(cfg)`` runs (or resumes) a run described by a :class:`~poet_jax.train.config.Config`
and returns a summary dict. Rerunning with the same ``train.output_dir`` resumes from the
newest complete Orbax checkpoint (policy, optimizer state, step, RNG, sampler position);
the frozen reference is rebuilt from the initial weights and precomputed reference
log-probs are read back from their cache. Metrics logged after that checkpoint by the
interrupted run are dropped from ``metrics.jsonl``, so the log equals an uninterrupted
run's.

Scale: the mesh ``(data, fsdp, tensor)`` comes from ``train.data_parallel/fsdp/tensor``;
parameters, optimizer state and the frozen reference are sharded by the logical-axis
rules of :mod:`poet_jax.sharding`, batches over ``data x fsdp``. With several processes
(``poet_jax.distributed.initialize_from_env``), each process reads only its share of every
global batch (``BatchSampler(process_index, process_count)``) and the global arrays are
assembled with ``jax.make_array_from_process_local_data`` without moving data; only
process 0 writes logs, ``config.yaml`` and the HF export; checkpoints are collective.

Faults (see :mod:`poet_jax.train.faults`): SIGTERM -> checkpoint of the current step and a
normal return; NaN/Inf -> the update is dropped and the run stops (``on_nonfinite=stop``)
or continues (``skip``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P

from poet_jax.data.batch import PreferenceBatch
from poet_jax.data.sampler import BatchSampler, batch_from_plan, eval_plans, row_lengths

from . import flops as flops_mod
from .checkpoint import Checkpointer
from .faults import FaultInjection, NonFiniteError, PreemptionWatch
from .config import Config, ConfigError, config_to_dict, is_hub_id, micro_batch, resolved_reference_mode
from .logger import MetricsLogger, Progress
from .optim import make_optimizer
from .reference import cache_key, examples_fingerprint, load_or_compute, model_fingerprint, precompute_logps
from .step import (
    StepConfig,
    TrainState,
    finalize_metrics,
    jit_eval_step,
    jit_train_step,
    loss_hparams,
    make_state,
    row_logps,
)
from . import data_bridge
from .tiny import ensure_model_dir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- setup helpers


def resolve_model_dir(cfg: Config) -> Path:
    """Local model directory: the configured one (tiny model created if asked) or the Hub cache snapshot."""
    if is_hub_id(cfg.model.path) and not cfg.model.create_tiny:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(cfg.model.path))
        except Exception as err:  # offline, gated, missing
            raise ConfigError(f"model.path: cannot resolve Hub model {cfg.model.path!r}: {err}") from None
    return ensure_model_dir(cfg)


def build_mesh(cfg: Config):
    """The ``(data, fsdp, tensor)`` mesh over all devices of all processes (MeshError if it does not fit)."""
    from poet_jax.sharding import MeshError, make_mesh

    t = cfg.train
    n = len(jax.devices())
    if t.data_parallel == 0 and n % (t.fsdp * t.tensor):
        raise MeshError(
            f"train.fsdp={t.fsdp} x train.tensor={t.tensor} = {t.fsdp * t.tensor} devices does not divide the "
            f"{n} available devices"
        )
    mesh = make_mesh({"data": t.data_parallel or -1, "fsdp": t.fsdp, "tensor": t.tensor})
    pc = jax.process_count()
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_ways % pc:
        raise MeshError(
            f"with {pc} processes the batch must be split over them: data x fsdp = {batch_ways} is not a multiple "
            f"of {pc} (put more devices on train.data_parallel / train.fsdp)"
        )
    return mesh


def put_global(x: np.ndarray, sharding: NamedSharding, batch_axis: int) -> jax.Array:
    """This process's rows ``x`` -> the global array (rows of all processes along ``batch_axis``).

    One process: a plain ``device_put``. Several: ``make_array_from_process_local_data``
    (each process supplies its own block; nothing crosses processes).
    """
    pc = jax.process_count()
    if pc == 1:
        return jax.device_put(x, sharding)
    shape = list(x.shape)
    shape[batch_axis] *= pc
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))


def batch_sharding(mesh, ndim: int, batch_axis: int) -> NamedSharding:
    """Rows (``batch_axis``) split over the data and fsdp mesh axes, everything else replicated."""
    spec = [None] * ndim
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    spec[batch_axis] = axes if axes else None
    return NamedSharding(mesh, P(*spec))


ROW_KEYS = ("input_ids", "attention_mask", "response_mask")


def batch_shardings(mesh, with_ref: bool, micro: bool) -> dict[str, NamedSharding]:
    """Per-key shardings of a step batch: ``[A, 2b, L]`` rows (``micro``) or ``[2b, L]`` rows split over devices."""
    lead = 1 if micro else 0
    out = {k: batch_sharding(mesh, 2 + lead, lead) for k in ROW_KEYS}
    out["pair_valid"] = batch_sharding(mesh, 1 + lead, lead)
    if with_ref:
        out["ref_logps"] = batch_sharding(mesh, 1 + lead, lead)
    return out


def to_micro_batches(batch: PreferenceBatch, n_micro: int, ref: np.ndarray | None = None,
                     groups: int = 1) -> dict[str, np.ndarray]:
    """``[2B, L]`` batch -> ``[A, 2b, L]`` micro-batches (each: its b chosen rows then its b rejected rows).

    ``groups > 1``: the rows of a micro-batch are ``groups`` blocks ``[b/g chosen; b/g rejected]``
    (pairs in order), one per batch shard, so a pair's two rows always live on the same
    device and process (the multi-process layout, ``StepConfig.row_groups``). With several
    processes ``batch`` is this process's share and the result its block of the global
    micro-batches.

    ``ref``: optional ``[B, 2]`` precomputed reference log-probs (chosen, rejected) of the pairs.
    """
    bsz = batch.num_pairs
    if bsz % (n_micro * groups):
        raise ValueError(f"batch of {bsz} pairs cannot be split into {n_micro} micro-batches of {groups} row groups")
    b = bsz // n_micro

    def rows(c, r):  # [B, ...] chosen and rejected -> [A, 2b, ...]
        tail = c.shape[1:]
        c = c.reshape(n_micro, groups, 1, b // groups, *tail)
        r = r.reshape(n_micro, groups, 1, b // groups, *tail)
        return np.concatenate([c, r], axis=2).reshape(n_micro, 2 * b, *tail)

    out = {k: rows(getattr(batch, k)[:bsz], getattr(batch, k)[bsz:]) for k in ROW_KEYS}
    out["pair_valid"] = batch.pair_valid.reshape(n_micro, b)
    if ref is not None:
        out["ref_logps"] = rows(ref[:, 0], ref[:, 1]).astype(np.float32)
    return out


PACKED_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "chosen_targets", "chosen_mask",
               "rejected_targets", "rejected_mask", "pair_slot", "pair_valid")


def packed_batch_shardings(mesh, with_ref: bool = False) -> dict[str, NamedSharding]:
    """Per-key shardings of packed micro-batches ``[A, R, L]`` / ``[A, R, M]``: rows ``R`` split over
    ``data x fsdp``; ``ref_logps`` ``[A, 2N]`` (pair slots, chosen then rejected) replicated."""
    out = {k: batch_sharding(mesh, 3, 1) for k in PACKED_KEYS}
    if with_ref:
        out["ref_logps"] = NamedSharding(mesh, P())
    return out


def layout_options(cfg: Config) -> dict:
    """``{"shared_prompt", "max_pairs_per_row", "row_length", "length_multiple"}`` of a non-two_row
    ``data.layout`` (the keyword arguments of :func:`to_packed_micro_batches`)."""
    d = cfg.data
    if d.layout not in ("shared_prompt", "packed", "packed_shared"):
        raise ConfigError(f"data.layout={d.layout!r} has no packing options")
    return {
        "shared_prompt": d.layout in ("shared_prompt", "packed_shared"),
        "max_pairs_per_row": 1 if d.layout == "shared_prompt" else d.max_pairs_per_row,
        "row_length": d.packed_row_length or 2 * d.max_length,
        "length_multiple": d.packed_length_multiple,
    }


def to_packed_micro_batches(examples: Sequence, indices: np.ndarray, valid: np.ndarray | None, n_micro: int,
                            pad_id: int, *, shared_prompt: bool, max_pairs_per_row: int, row_length: int,
                            row_multiple: int = 1, length_multiple: int = 0) -> dict[str, np.ndarray]:
    """A global batch of pairs -> ``A = n_micro`` packed micro-batches (``PackedBatch.as_dict()`` stacked).

    ``indices`` ``[B]`` example indices, ``valid`` ``[B]`` (0: filler pair, dropped; None = all real).
    Micro-batch ``a`` packs pairs ``a*b .. (a+1)*b - 1`` (``b = B / A``, the same pairs as
    :func:`to_micro_batches`) first-fit into rows of ``row_length`` slots; every micro-batch is
    padded with empty rows to the same row count (a multiple of ``row_multiple``).
    ``length_multiple > 0``: the pairs are balanced over those rows and every row is cut to the
    smallest multiple of ``length_multiple`` (at most ``row_length``) that holds the fullest one,
    so the compiled shapes stay in the fixed set ``{multiples of length_multiple} x {row counts}``.
    Returns int32 ``[A, R, L]`` row arrays and ``pair_valid`` ``[A, R, M]``, plus
    ``example_index`` ``[A, R, M]`` (host only; -1 for empty slots).
    """
    from poet_jax.data.packing import make_packed_batch, pack_pairs, row_fill

    idx = np.asarray(indices, np.int64).copy()
    if valid is not None:
        idx[np.asarray(valid) == 0] = -1
    if idx.size % n_micro:
        raise ValueError(f"batch of {idx.size} pairs cannot be split into {n_micro} micro-batches")
    b = idx.size // n_micro
    plans = [pack_pairs(examples, idx[a * b:(a + 1) * b], num_rows=None, row_length=row_length,
                        max_pairs_per_row=max_pairs_per_row, shared_prompt=shared_prompt, row_multiple=row_multiple,
                        balance=length_multiple > 0)
             for a in range(n_micro)]
    rows = max(p.shape[0] for p in plans)
    plans = [np.concatenate([p, np.full((rows - p.shape[0], p.shape[1]), -1, np.int64)]) for p in plans]
    if length_multiple > 0:
        fill = max(row_fill(examples, p, shared_prompt) for p in plans)
        row_length = min(row_length, max(-(-fill // length_multiple) * length_multiple, length_multiple))
    packed = [make_packed_batch(examples, p, pad_id, row_length=row_length, shared_prompt=shared_prompt)
              for p in plans]
    out = {k: np.stack([getattr(pb, k) for pb in packed]) for k in PACKED_KEYS}
    out["example_index"] = np.stack(plans)
    return out


def packed_sequence_sizes(segment_ids: np.ndarray, branch_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, attended)`` per sequence of packed rows (int ``[..., L]`` segment / branch ids):
    real tokens and the (query, key) pairs its block mask lets attention score (float64)."""
    seg = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
    br = np.asarray(branch_ids).reshape(seg.shape)
    sizes = []
    for s, b in zip(seg, br):
        k = int(s.max()) + 1
        sizes.append(np.stack([np.bincount(s[b == i], minlength=k)[1:] for i in (0, 1, 2)], axis=1))
    pcr = np.concatenate(sizes) if sizes else np.zeros((0, 3), np.int64)
    pcr = pcr[pcr.sum(axis=1) > 0]
    return pcr.sum(axis=1), flops_mod.shared_prompt_attended(pcr[:, 0], pcr[:, 1], pcr[:, 2])


def packed_reference_slots(ref: np.ndarray, example_index: np.ndarray) -> np.ndarray:
    """Precomputed reference log-probs laid out like packed per-pair outputs.

    ``ref`` float32 ``[num_examples, 2]`` (chosen, rejected), ``example_index`` int ``[A, R, M]``
    (``-1`` = empty pair slot) -> float32 ``[A, 2N]`` (``N = R * M`` pair slots, chosen then
    rejected; 0 for empty slots), the ``ref_logps`` that ``step.packed_micro_batch_sums`` reads.
    """
    idx = np.asarray(example_index).reshape(example_index.shape[0], -1)
    vals = np.where((idx >= 0)[..., None], np.asarray(ref, np.float32)[np.maximum(idx, 0)], 0.0)
    return np.concatenate([vals[..., 0], vals[..., 1]], axis=1).astype(np.float32)


def group_rows(x: np.ndarray, groups: int) -> np.ndarray:
    """``[2b, ...]`` rows ``[chosen; rejected]`` -> the ``groups``-block layout of :func:`to_micro_batches`."""
    if groups == 1:
        return x
    b = x.shape[0] // 2
    tail = x.shape[1:]
    return np.stack([x[:b].reshape(groups, b // groups, *tail), x[b:].reshape(groups, b // groups, *tail)],
                    axis=1).reshape(2 * b, *tail)


def _check_process_split(cfg: Config, pc: int) -> None:
    """Every process must get an equal share of every (micro / eval) batch."""
    if pc == 1:
        return
    t = cfg.train
    for key, val in (("train.global_batch", t.global_batch), ("train.micro_batch", micro_batch(cfg)),
                     ("train.eval_batch", t.eval_batch or micro_batch(cfg))):
        if val % pc:
            raise ConfigError(f"{key}={val} is not divisible by the {pc} processes")


def _check_packed_fit(cfg: Config, examples: Sequence) -> None:
    """Every training pair must fit one packed row (``data.packed_row_length``)."""
    from poet_jax.data.packing import pair_tokens

    opts = layout_options(cfg)
    for i, e in enumerate(examples):
        n = pair_tokens(e, opts["shared_prompt"])
        if n > opts["row_length"]:
            raise ConfigError(f"data.packed_row_length={opts['row_length']}: training pair {i} needs {n} row slots "
                              f"in data.layout={cfg.data.layout!r}; raise data.packed_row_length")


def _check_batch_shards(cfg: Config, mesh, row_groups: int) -> None:
    """Batch rows are split over ``data x fsdp``; with row groups (several processes) each shard holds
    whole pairs, otherwise the ``2b`` rows just have to divide evenly."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    t = cfg.train
    rows_per_pair = 1 if row_groups > 1 else 2
    for key, val in (("train.micro_batch", micro_batch(cfg)), ("train.eval_batch", t.eval_batch or micro_batch(cfg))):
        if (rows_per_pair * val) % ways:
            raise ConfigError(f"{key}={val} pairs ({rows_per_pair * val} rows) cannot be split over the {ways} "
                              "batch shards (data x fsdp)")


def serialize_cpu_collectives(x):
    """Wait for ``x`` when several processes share CPU devices; returns ``x``.

    Gloo matches collectives by issue order. Two independent programs in flight at once (two
    evaluation batches, a step and the preemption poll) can issue theirs in a different order
    on different processes ("collective mismatch"), so on CPU each program finishes before the
    next one starts. TPU/GPU runtimes order collectives themselves: nothing changes there.
    """
    if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
        jax.block_until_ready(x)
    return x


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _gather_rows(x: np.ndarray, mesh) -> np.ndarray:
    """This process's ``[n]`` host values -> the global ``[n * processes]`` vector on every process."""
    from jax.experimental import multihost_utils

    arr = put_global(np.asarray(x), batch_sharding(mesh, 1, 0), 0)
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


def _device_kind() -> str:
    return jax.devices()[0].device_kind


@dataclasses.dataclass
class Run:
    """Everything ``train`` sets up (also used by tests and the benchmark)."""

    cfg: Config
    model_dir: Path
    tokenizer: Any
    mesh: Any
    graphdef: Any
    state: TrainState
    step_cfg: StepConfig
    tx: Any
    schedule: Any
    train_examples: list
    eval_examples: list
    sampler: BatchSampler
    total_steps: int
    ref_mode: str
    ref_train: np.ndarray | None
    ref_eval: np.ndarray | None
    model_config: dict
    data_report: Any = None
    buckets: tuple[int, ...] | None = None
    pad_token: int | None = None
    rng: Any = None
    faults: FaultInjection = dataclasses.field(default_factory=FaultInjection)

    def __post_init__(self):
        # hashes every training pair's ids: computed once (checkpoint metadata, resume check, reference cache)
        self.train_fingerprint = examples_fingerprint(self.train_examples)
    _train_fn: Any = None
    _eval_fn: Any = None

    # -- compiled functions -------------------------------------------------------------
    def state_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.state)

    def train_fn(self):
        if self._train_fn is None:
            shards = (packed_batch_shardings(self.mesh, self.ref_mode == "precomputed") if self.step_cfg.packed
                      else batch_shardings(self.mesh, self.ref_mode == "precomputed", micro=True))
            self._train_fn = jit_train_step(
                self.step_cfg, self.graphdef, self.tx, self.schedule, self.state_shardings(), shards,
            )
        return self._train_fn

    def eval_fn(self):
        if self._eval_fn is None:
            # evaluation always uses the two-row layout
            eval_cfg = dataclasses.replace(self.step_cfg, packed=False)
            self._eval_fn = jit_eval_step(eval_cfg, self.graphdef, self.state_shardings(),
                                          batch_shardings(self.mesh, self.ref_mode == "precomputed", micro=False))
        return self._eval_fn

    @property
    def n_micro(self) -> int:
        return self.cfg.train.global_batch // micro_batch(self.cfg)

    # -- one step -----------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return self.cfg.data.layout

    def packed_batch(self, indices, valid=None) -> dict[str, np.ndarray]:
        """Packed micro-batches (:func:`to_packed_micro_batches`) of the given global batch of pairs
        for the configured non-two_row ``data.layout``; pass the result to :meth:`step`."""
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        out = to_packed_micro_batches(self.train_examples, indices, valid, self.n_micro, self.pad_id,
                                      row_multiple=ways, **layout_options(self.cfg))
        if self.ref_train is not None:
            out["ref_logps"] = packed_reference_slots(self.ref_train, out["example_index"])
        return out

    def next_global_batch(self) -> tuple[PreferenceBatch | dict, np.ndarray | None]:
        """The next sampler batch: a ``PreferenceBatch`` (two_row) or packed micro-batches (a dict)."""
        plan = next(self.sampler)
        if self.step_cfg.packed:
            return self.packed_batch(plan.indices, plan.valid), None
        batch = batch_from_plan(self.train_examples, plan, self.pad_id)
        ref = self.ref_train[plan.indices] if self.ref_train is not None else None
        return batch, ref

    @property
    def pad_id(self) -> int:
        if self.pad_token is not None:
            return int(self.pad_token)
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @property
    def local_row_groups(self) -> int:
        """Row groups of this process's share of a micro-batch (see :func:`to_micro_batches`)."""
        return self.step_cfg.row_groups // jax.process_count()

    def step(self, batch: PreferenceBatch, ref: np.ndarray | None = None) -> dict:
        """Run one optimizer step on a global batch (this process's share of it when several
        processes run); updates ``self.state``; returns device metrics (replicated scalars).

        Packed layouts: ``batch`` is the dict of :meth:`packed_batch` (``ref`` must be None)."""
        if isinstance(batch, dict):
            if not self.step_cfg.packed:
                raise ValueError("Run.step got packed micro-batches but data.layout is two_row")
            with_ref = self.ref_mode == "precomputed"
            if with_ref != ("ref_logps" in batch):
                raise ValueError("Run.step: packed micro-batches "
                                 + ("lack ref_logps (reference.mode=precomputed)" if with_ref
                                    else f"carry ref_logps but reference.mode={self.ref_mode}"))
            shardings = packed_batch_shardings(self.mesh, with_ref)
            dev = {k: jax.device_put(batch[k], shardings[k]) for k in shardings}
            self.state, metrics = self.train_fn()(self.state, dev)
            return metrics
        if self.step_cfg.packed:
            raise ValueError(f"data.layout={self.layout!r}: Run.step needs the packed micro-batches of "
                             "Run.packed_batch, not a PreferenceBatch")
        arrays = to_micro_batches(batch, self.n_micro, ref, self.local_row_groups)
        shardings = batch_shardings(self.mesh, ref is not None, micro=True)
        dev = {k: put_global(v, shardings[k], 1) for k, v in arrays.items()}
        self.state, metrics = self.train_fn()(self.state, dev)
        return serialize_cpu_collectives(metrics)

    def evaluate(self, max_pairs: int = 0) -> dict:
        """Loss, reward accuracy and margins over the held-out pairs (all, or the first ``max_pairs``)."""
        examples = self.eval_examples
        if not examples:
            return {}
        n = len(examples) if not max_pairs else min(max_pairs, len(examples))
        bsz = self.cfg.train.eval_batch or micro_batch(self.cfg)
        lengths = row_lengths(examples)[:n]
        totals: dict[str, Any] = {}
        fn = self.eval_fn()
        for plan in eval_plans(lengths, bsz, bucket_lengths=self.buckets, process_index=jax.process_index(),
                               process_count=jax.process_count()):
            batch = batch_from_plan(examples, plan, self.pad_id).as_dict()
            if self.ref_eval is not None:
                ref = self.ref_eval[plan.indices]
                batch["ref_logps"] = np.concatenate([ref[:, 0], ref[:, 1]]).astype(np.float32)
            g = self.local_row_groups
            batch = {k: (v if k == "pair_valid" else group_rows(v, g)) for k, v in batch.items()}
            shards = batch_shardings(self.mesh, "ref_logps" in batch, micro=False)
            batch = {k: put_global(v, shards[k], 0) for k, v in batch.items()}
            sums = serialize_cpu_collectives(fn(self.state, batch))
            totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        out = finalize_metrics(totals)
        return {k: float(v) for k, v in out.items()}

    def flops(self, batch: PreferenceBatch | dict) -> float:
        if isinstance(batch, dict):  # packed: every sequence (segment of a row) and its branches
            lengths, attended = packed_sequence_sizes(batch["segment_ids"], batch["branch_ids"])
            return flops_mod.preference_step_flops(self.model_config, lengths,
                                                   with_reference=self.ref_mode == "frozen", attended=attended)
        lengths = batch.attention_mask.sum(axis=1)[np.concatenate([batch.pair_valid, batch.pair_valid]) > 0]
        return flops_mod.preference_step_flops(self.model_config, lengths, with_reference=self.ref_mode == "frozen")


def setup(cfg: Config, *, progress: bool | None = None) -> Run:
    """Load tokenizer, data, model(s), optimizer and (if any) the precomputed reference."""
    from transformers import AutoTokenizer

    from poet_jax.models import from_pretrained

    show = cfg.train.progress if progress is None else progress
    pc, pi = jax.process_count(), jax.process_index()
    _check_process_split(cfg, pc)
    if cfg.data.layout != "two_row" and pc > 1:
        raise ConfigError(f"data.layout={cfg.data.layout!r} runs in a single process only ({pc} processes); "
                          "use data.layout=two_row")
    mesh = build_mesh(cfg)  # fail fast when the mesh does not fit the devices
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pc > 1:  # the primary creates a tiny model (if asked) before the others look for it
        if pi == 0:
            resolve_model_dir(cfg)
        _barrier("poet_jax_model_dir")
    model_dir = resolve_model_dir(cfg)
    tok_dir = cfg.model.tokenizer or str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = data_bridge.build(cfg, tokenizer, show_progress=show)
    train_examples, eval_examples, report = data.train_examples, data.eval_examples, data.report
    if cfg.train.eval_pairs:
        eval_examples = eval_examples[: cfg.train.eval_pairs]

    if cfg.data.layout != "two_row":
        _check_packed_fit(cfg, train_examples)

    gb = cfg.train.global_batch
    sampler = BatchSampler(row_lengths(train_examples), gb, bucket_lengths=data.bucket_lengths, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length, drop_last=False,
                           process_index=pi, process_count=pc)
    steps_per_epoch = sampler.steps_per_epoch
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

    compute = DTYPES[cfg.train.dtype]
    model = from_pretrained(model_dir, dtype=compute, param_dtype=jnp.float32, mesh=mesh,
                            remat=cfg.model.remat, scan_layers=cfg.model.scan_layers)
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    ref_mode = resolved_reference_mode(cfg)
    tx, schedule = make_optimizer(cfg.optim, total)
    graphdef, state = make_state(model, tx, mesh=mesh)
    del model
    if ref_mode == "frozen":
        rdt = DTYPES[cfg.reference.dtype]
        # float32: astype would be a no-op; x + 0 makes a real copy so donation cannot alias it
        cast = (lambda x: x + 0) if rdt == jnp.float32 else (lambda x: x.astype(rdt))
        state = state.replace(ref_params=jax.jit(lambda p: jax.tree.map(cast, p))(state.params))

    faults = FaultInjection.from_env()
    # one process: plain [chosen; rejected] rows; several: one [chosen; rejected] block per batch shard
    row_groups = 1 if pc == 1 else mesh.shape["data"] * mesh.shape["fsdp"]
    _check_batch_shards(cfg, mesh, row_groups)
    packed = cfg.data.layout != "two_row"
    step_cfg = StepConfig(loss=cfg.loss.name, hparams=loss_hparams(cfg.loss),
                          reference=ref_mode, logps_chunk=cfg.train.logps_chunk, row_groups=row_groups,
                          inject_nan_at_step=faults.nan_at_step, packed=packed)
    run = Run(cfg=cfg, model_dir=Path(model_dir), tokenizer=tokenizer, mesh=mesh, graphdef=graphdef, state=state,
              step_cfg=step_cfg, tx=tx, schedule=schedule, train_examples=train_examples,
              eval_examples=eval_examples, sampler=sampler, total_steps=total, ref_mode=ref_mode,
              ref_train=None, ref_eval=None, model_config=model_config, data_report=report,
              buckets=data.bucket_lengths, pad_token=data.pad_id, rng=jax.random.key(cfg.train.seed), faults=faults)
    if ref_mode == "precomputed":
        run.ref_train, run.ref_eval = precompute_reference(run, show)
    return run


def precompute_reference(run: Run, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference log-probs ``[N, 2]`` of the train and eval pairs (cached on disk)."""
    cfg = run.cfg
    cache_dir = Path(cfg.reference.cache_dir or Path(cfg.train.output_dir) / "ref_cache")
    settings = {"compute_dtype": cfg.train.dtype, "ref_dtype": cfg.reference.dtype}
    splits = {"train": run.train_fingerprint, "eval": examples_fingerprint(run.eval_examples)}
    key = cache_key(model_fingerprint(run.model_dir), splits, settings)
    bsz = cfg.reference.batch_pairs or micro_batch(cfg)
    rdt = DTYPES[cfg.reference.dtype]
    params = run.state.params
    if rdt != jnp.float32:
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(rdt), p))(params)
    fn = jax.jit(lambda p, r, b: row_logps(run.graphdef, p, r, b, cfg.train.logps_chunk))
    shards = batch_shardings(run.mesh, False, micro=False)
    pc = jax.process_count()

    groups = run.step_cfg.row_groups

    def logps_fn(b):
        lg = run.local_row_groups
        b = {k: (v if k == "pair_valid" else group_rows(v, lg)) for k, v in b.items()}
        vals = serialize_cpu_collectives(fn(params, run.state.rest,
                                            {k: put_global(v, shards[k], 0) for k, v in b.items()}))
        if pc == 1:
            return vals
        from jax.experimental import multihost_utils

        # grouped rows [G, 2, b/G] of the whole global batch -> [chosen of all; rejected of all]
        full = np.asarray(multihost_utils.process_allgather(vals, tiled=True))
        return full.reshape(groups, 2, -1).transpose(1, 0, 2).reshape(-1)

    def batches(examples):
        for plan in eval_plans(row_lengths(examples), bsz, bucket_lengths=run.buckets, process_index=jax.process_index(),
                               process_count=pc):
            batch = batch_from_plan(examples, plan, run.pad_id)
            if pc == 1:
                yield plan.indices, plan.valid, batch
            else:  # the global pairs of this batch, in the global array's block order
                yield _gather_rows(plan.indices, run.mesh), _gather_rows(plan.valid, run.mesh), batch

    def compute():
        out = {"train": precompute_logps(logps_fn, run.train_examples, list(batches(run.train_examples)), progress,
                                         "reference log-probs (train)")}
        if run.eval_examples:
            out["eval"] = precompute_logps(logps_fn, run.eval_examples, list(batches(run.eval_examples)), progress,
                                           "reference log-probs (eval)")
        return out

    arrays, _ = load_or_compute(cache_dir / f"{key}.npz", compute)
    return arrays["train"], arrays.get("eval")


# ----------------------------------------------------------------------------- checkpoints


def _meta(run: Run) -> dict:
    rng = None if run.rng is None else np.asarray(jax.random.key_data(run.rng)).ravel().tolist()
    return {
        "sampler": run.sampler.state_dict(),
        "rng": rng,
        "config": config_to_dict(run.cfg),
        "model_dir": str(run.model_dir),
        "train_fingerprint": run.train_fingerprint,
        "process_count": jax.process_count(),
    }


def save_checkpoint(run: Run, ckpt: Checkpointer, block: bool | None = None) -> int:
    """Save policy, optimizer state, step, RNG and sampler position (collective); returns the step."""
    step = int(jax.device_get(run.state.step))
    ckpt.save(step, run.state.checkpoint_tree(), _meta(run), block=block)
    return step


def restore_checkpoint(run: Run, ckpt: Checkpointer, step: int | None = None) -> int:
    """Restore policy, optimizer state, step, RNG and sampler position; returns the restored step."""
    step = ckpt.latest_step() if step is None else step
    tree, meta = ckpt.restore(step, run.state.checkpoint_tree())
    fp = meta.get("train_fingerprint")
    if fp is not None and fp != run.train_fingerprint:
        raise ConfigError(
            f"train.output_dir: {run.cfg.train.output_dir} holds a checkpoint trained on different data; "
            "use a new output_dir"
        )
    run.state = run.state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
    try:
        run.sampler.load_state_dict(meta["sampler"])
    except ValueError as err:
        raise ConfigError(f"train.output_dir: cannot resume from checkpoint {step}: {err}") from None
    if meta.get("rng") is not None and run.rng is not None:
        data = np.asarray(meta["rng"], np.uint32).reshape(jax.random.key_data(run.rng).shape)
        run.rng = jax.random.wrap_key_data(data)
    return int(step)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop records after ``last_step`` (and any torn last line) from a metrics.jsonl; returns records kept.

    A run killed after its newest checkpoint logged steps that the resumed run repeats;
    without this the log would hold them twice.
    """
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)
    return len(kept)


def state_sharding_report(run: Run) -> dict:
    """Per-leaf ``{path: {"shape", "spec", "device_bytes", "total_bytes"}}`` of params and optimizer state."""

    def one(tree, prefix):
        rows = {}
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if not hasattr(x, "sharding"):
                continue
            shard = x.sharding.shard_shape(x.shape)
            rows[prefix + jax.tree_util.keystr(path)] = {
                "shape": list(x.shape),
                "spec": [None if a is None else (list(a) if isinstance(a, tuple) else a)
                         for a in getattr(x.sharding, "spec", ())],
                "device_bytes": int(np.prod(shard, dtype=np.int64)) * x.dtype.itemsize,
                "total_bytes": int(x.size) * x.dtype.itemsize,
            }
        return rows

    out = {"mesh": {k: int(v) for k, v in run.mesh.shape.items()}, "processes": jax.process_count()}
    out["params"] = one(run.state.params, "params")
    out["opt_state"] = one(run.state.opt_state, "opt_state")
    if run.state.ref_params is not None:
        out["ref_params"] = one(run.state.ref_params, "ref_params")
    return out


# ----------------------------------------------------------------------------- the loop


def _nonfinite_message(step: int, rec: dict, last_ckpt: int | None) -> str:
    where = f"the newest checkpoint is step {last_ckpt}" if last_ckpt is not None else "no checkpoint was written"
    return (f"non-finite loss or gradient at step {step} (loss={rec.get('loss')}, grad_norm={rec.get('grad_norm')}); "
            f"the update was not applied and the run stopped; {where}. Set train.on_nonfinite=skip to drop such "
            "updates and continue")


def _evaluate_with_hooks(run: Run, max_pairs: int, hooks: Sequence[Callable[[Run], dict]]) -> dict:
    metrics = dict(run.evaluate(max_pairs))
    for hook in hooks:
        metrics.update(hook(run))
    return metrics


def train(cfg: Config, *, progress: bool | None = None,
          eval_hooks: Sequence[Callable[[Run], dict]] = ()) -> dict:
    """Train (or resume) per ``cfg``; returns ``{"final_step", "train_metrics", "eval_metrics", "export_dir",
    "total_steps", "preempted", "skipped_steps"}``.

    ``eval_hooks``: callables ``hook(run) -> {name: float}`` whose results are merged into every
    evaluation record (the CLI uses one to log the M_k prefix margins of poet_jax.evaluate, which
    this stage may not import).

    Raises :class:`~poet_jax.train.faults.NonFiniteError` on a NaN/Inf step with ``train.on_nonfinite=stop``.
    """
    primary = jax.process_index() == 0
    show = (cfg.train.progress if progress is None else progress) and primary
    out = Path(cfg.train.output_dir)
    watch = PreemptionWatch()  # before setup: a notice during start-up also ends in a clean exit
    try:
        run = setup(cfg, progress=show)
    except BaseException:
        watch.close()
        raise
    if primary:
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    t = cfg.train
    # Several processes on CPU devices: saves stay synchronous (Orbax's background commit may issue
    # cross-process syncs while a step's gloo collectives are in flight; gloo needs one issue order).
    # POET_JAX_ASYNC_CHECKPOINT_MULTIPROCESS=1 opts in anyway. TPU/GPU jobs save asynchronously.
    async_save = t.async_checkpoint and (
        jax.process_count() == 1 or jax.devices()[0].platform != "cpu"
        or os.environ.get("POET_JAX_ASYNC_CHECKPOINT_MULTIPROCESS", "") == "1")
    ckpt = Checkpointer(out / "checkpoints", keep=t.keep_checkpoints, async_save=async_save,
                        on_save_started=run.faults.in_save)
    start = 0
    if ckpt.latest_step() is not None:
        start = restore_checkpoint(run, ckpt)
    if primary:
        truncate_metrics(out / "metrics.jsonl", start)
        (out / "shardings.json").write_text(json.dumps(state_sharding_report(run), indent=1))
    logger = MetricsLogger(out, tensorboard=t.tensorboard, enabled=primary)
    bar = Progress(run.total_steps, initial=start, enabled=show)
    peak = flops_mod.peak_flops_per_device(_device_kind(), t.peak_tflops)
    n_dev = jax.local_device_count()  # run.flops counts this process's share of the batch
    last_train: dict = {}
    last_eval: dict = {}
    pending: list[tuple[int, Any]] = []
    skipped: list[int] = []
    preempted = False
    export_dir = None
    final_step = start
    window = {"flops": 0.0, "steps": 0, "t0": time.perf_counter()}  # since the last flush

    def say(msg: str) -> None:
        if primary:
            bar.write(msg)

    def flush() -> None:
        """Host-convert pending metrics, check them for NaN/Inf, log them."""
        nonlocal pending, last_train, window
        if not pending:
            return
        host = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending = []
        bad = None
        for s_i, h in host:
            if h.get("nonfinite", 0.0) > 0 and s_i not in skipped:
                skipped.append(s_i)
                bad = bad or (s_i, h)
                say(f"step {s_i}: non-finite loss or gradient (loss={h.get('loss')}, grad_norm={h.get('grad_norm')}); "
                    "update not applied")
        elapsed = time.perf_counter() - window["t0"]
        tokens = sum(h["tokens"] for _, h in host)
        pairs = sum(h["pairs"] for _, h in host)
        s, rec = host[-1]
        rec = dict(rec)
        rec["tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
        rec["pairs_per_second"] = pairs / elapsed if elapsed > 0 else 0.0
        rec["steps_per_second"] = window["steps"] / elapsed if elapsed > 0 else 0.0
        rec["tflops_per_device"] = window["flops"] / elapsed / n_dev / 1e12 if elapsed > 0 else 0.0
        rec["mfu"] = flops_mod.mfu(window["flops"], elapsed, n_dev, peak)
        rec["poet/kept_fraction"] = _kept_fraction(run, rec)
        rec["epoch"] = s / run.sampler.steps_per_epoch
        for s_i, h in host[:-1]:
            logger.log(s_i, h)
        last_train = logger.log(s, rec)
        bar.update(0, rec)
        window = {"flops": 0.0, "steps": 0, "t0": time.perf_counter()}
        if bad is not None and t.on_nonfinite == "stop":
            ckpt.wait()  # let a background save of an earlier (clean) step finish
            raise NonFiniteError(_nonfinite_message(bad[0], bad[1], ckpt.latest_step()))

    try:
        for step in range(start, run.total_steps):
            batch, ref = run.next_global_batch()
            metrics = run.step(batch, ref)
            done = step + 1
            run.faults.after_step(done)
            window["flops"] += run.flops(batch)
            window["steps"] += 1
            pending.append((done, metrics))
            is_last = done == run.total_steps
            if t.on_nonfinite == "stop" and len(pending) >= 2:
                # one step behind (keeps the device busy): stop at the first bad step
                if float(jax.device_get(pending[-2][1]["nonfinite"])) > 0:
                    pending = pending[:-1]  # `done` ran on a clean state but is not logged: resume repeats it
                    flush()
            if done % t.log_every == 0 or is_last:
                flush()
            bar.update(1)
            if t.eval_every and done % t.eval_every == 0 and not is_last and run.eval_examples:
                t_eval = time.perf_counter()
                last_eval = logger.log(done, _evaluate_with_hooks(run, t.eval_pairs, eval_hooks), split="eval")
                say(_eval_line(done, last_eval))
                # rates cover training time only; the window may still hold unlogged steps
                window["t0"] += time.perf_counter() - t_eval
            if watch.should_stop():
                flush()
                ckpt.wait()
                saved = save_checkpoint(run, ckpt, block=True) if ckpt.latest_step() != done else done
                say(f"preemption signal received: saved checkpoint at step {saved}; exiting")
                preempted = True
                final_step = done
                break
            if t.save_every and done % t.save_every == 0 and not is_last:
                flush()  # never checkpoint past an unchecked step
                save_checkpoint(run, ckpt)
                window["t0"] = time.perf_counter()
        if not preempted:
            flush()
            final_step = int(jax.device_get(run.state.step))
            if run.eval_examples:
                last_eval = logger.log(final_step, _evaluate_with_hooks(run, t.eval_pairs, eval_hooks), split="eval")
                say(_eval_line(final_step, last_eval))
            if ckpt.latest_step() != final_step:
                save_checkpoint(run, ckpt)
            if t.export:
                export_dir = export_policy(run, out / "hf")
    finally:
        watch.close()
        bar.close()
        logger.close()
        ckpt.close()
    return {"final_step": final_step, "train_metrics": last_train, "eval_metrics": last_eval,
            "export_dir": str(export_dir) if export_dir else None, "total_steps": run.total_steps,
            "preempted": preempted, "skipped_steps": list(skipped)}


def _kept_fraction(run: Run, rec: dict) -> float | None:
    """Fraction of response tokens POET keeps over the training set (1.0 without POET); from the data report."""
    rep = run.data_report
    before = getattr(rep, "response_tokens_before_poet", 0) if rep is not None else 0
    removed = getattr(rep, "poet_tokens_removed", 0) if rep is not None else 0
    if not before:
        return 1.0
    return 1.0 - removed / before


def _eval_line(step: int, m: dict) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    return f"eval @ step {step}: " + ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def export_policy(run: Run, out_dir: Path) -> Path:
    """Write the current policy (float32) and tokenizer as a Hugging Face directory."""
    from flax import nnx

    from poet_jax.models import save_pretrained

    params, rest = run.state.params, run.state.rest
    if jax.process_count() > 1:  # collective: every process gathers, the primary writes
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
        if jax.process_index() != 0:
            return Path(out_dir)
    model = nnx.merge(run.graphdef, params, rest)
    save_pretrained(model, out_dir, tokenizer=run.tokenizer)
    return Path(out_dir)


