"""The training loop: data -> jitted steps -> metrics / evaluation / checkpoints -> HF export.

``train(cfg)`` runs (or resumes) a run described by a :class:`~poet_jax.train.config.Config`
and returns a summary dict. Rerunning with the same ``train.output_dir`` resumes from the
latest Orbax checkpoint (policy, optimizer state, step, sampler position); the frozen
reference is rebuilt from the initial weights and precomputed reference log-probs are
read back from their cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P

from poet_jax.data.batch import PreferenceBatch
from poet_jax.data.sampler import BatchSampler, batch_from_plan, eval_plans, row_lengths

from . import flops as flops_mod
from .checkpoint import Checkpointer
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
    from poet_jax.sharding import make_mesh

    t = cfg.train
    return make_mesh({"data": t.data_parallel or -1, "fsdp": t.fsdp, "tensor": t.tensor})


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


def to_micro_batches(batch: PreferenceBatch, n_micro: int, ref: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Global ``[2B, L]`` batch -> ``[A, 2b, L]`` micro-batches (each: its b chosen rows then its b rejected rows).

    ``ref``: optional ``[B, 2]`` precomputed reference log-probs (chosen, rejected) of the pairs.
    """
    bsz = batch.num_pairs
    if bsz % n_micro:
        raise ValueError(f"batch of {bsz} pairs cannot be split into {n_micro} micro-batches")
    b = bsz // n_micro

    def rows(x):  # [2B, L] -> [A, 2b, L]
        c, r = x[:bsz].reshape(n_micro, b, -1), x[bsz:].reshape(n_micro, b, -1)
        return np.concatenate([c, r], axis=1)

    out = {
        "input_ids": rows(batch.input_ids),
        "attention_mask": rows(batch.attention_mask),
        "response_mask": rows(batch.response_mask),
        "pair_valid": batch.pair_valid.reshape(n_micro, b),
    }
    if ref is not None:
        out["ref_logps"] = np.concatenate(
            [ref[:, 0].reshape(n_micro, b), ref[:, 1].reshape(n_micro, b)], axis=1
        ).astype(np.float32)
    return out




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
    _train_fn: Any = None
    _eval_fn: Any = None

    # -- compiled functions -------------------------------------------------------------
    def state_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.state)

    def train_fn(self):
        if self._train_fn is None:
            self._train_fn = jit_train_step(
                self.step_cfg, self.graphdef, self.tx, self.schedule, self.state_shardings(),
                batch_shardings(self.mesh, self.ref_mode == "precomputed", micro=True),
            )
        return self._train_fn

    def eval_fn(self):
        if self._eval_fn is None:
            self._eval_fn = jit_eval_step(self.step_cfg, self.graphdef, self.state_shardings(),
                                          batch_shardings(self.mesh, self.ref_mode == "precomputed", micro=False))
        return self._eval_fn

    @property
    def n_micro(self) -> int:
        return self.cfg.train.global_batch // micro_batch(self.cfg)

    # -- one step -----------------------------------------------------------------------
    def next_global_batch(self) -> tuple[PreferenceBatch, np.ndarray | None]:
        plan = next(self.sampler)
        batch = batch_from_plan(self.train_examples, plan, self.pad_id)
        ref = self.ref_train[plan.indices] if self.ref_train is not None else None
        return batch, ref

    @property
    def pad_id(self) -> int:
        if self.pad_token is not None:
            return int(self.pad_token)
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def step(self, batch: PreferenceBatch, ref: np.ndarray | None = None) -> dict:
        """Run one optimizer step on a global batch (updates ``self.state``); returns device metrics."""
        arrays = to_micro_batches(batch, self.n_micro, ref)
        shardings = batch_shardings(self.mesh, ref is not None, micro=True)
        dev = {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}
        self.state, metrics = self.train_fn()(self.state, dev)
        return metrics

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
        for plan in eval_plans(lengths, bsz, bucket_lengths=self.buckets):
            batch = batch_from_plan(examples, plan, self.pad_id).as_dict()
            if self.ref_eval is not None:
                ref = self.ref_eval[plan.indices]
                batch["ref_logps"] = np.concatenate([ref[:, 0], ref[:, 1]]).astype(np.float32)
            shards = batch_shardings(self.mesh, "ref_logps" in batch, micro=False)
            batch = {k: jax.device_put(v, shards[k]) for k, v in batch.items()}
            sums = fn(self.state, batch)
            totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        out = finalize_metrics(totals)
        return {k: float(v) for k, v in out.items()}

    def flops(self, batch: PreferenceBatch) -> float:
        lengths = batch.attention_mask.sum(axis=1)[np.concatenate([batch.pair_valid, batch.pair_valid]) > 0]
        return flops_mod.preference_step_flops(self.model_config, lengths, with_reference=self.ref_mode == "frozen")


def setup(cfg: Config, *, progress: bool | None = None) -> Run:
    """Load tokenizer, data, model(s), optimizer and (if any) the precomputed reference."""
    from transformers import AutoTokenizer

    from poet_jax.models import from_pretrained

    show = cfg.train.progress if progress is None else progress
    if jax.process_count() > 1:
        raise NotImplementedError(
            "poet_jax.train runs in one process (any number of local devices); multi-host input "
            "assembly is not implemented yet"
        )
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(cfg)
    tok_dir = cfg.model.tokenizer or str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = data_bridge.build(cfg, tokenizer, show_progress=show)
    train_examples, eval_examples, report = data.train_examples, data.eval_examples, data.report
    if cfg.train.eval_pairs:
        eval_examples = eval_examples[: cfg.train.eval_pairs]

    mesh = build_mesh(cfg)
    gb = cfg.train.global_batch
    sampler = BatchSampler(row_lengths(train_examples), gb, bucket_lengths=data.bucket_lengths, seed=cfg.train.seed,
                           shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length, drop_last=False)
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
        ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(rdt), p))(state.params)
        if rdt == jnp.float32:  # astype is a no-op: make a real copy so donation cannot alias it
            ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p))(state.params)
        state = state.replace(ref_params=ref_params)

    step_cfg = StepConfig(loss=cfg.loss.name, hparams=loss_hparams(cfg.loss),
                          reference=ref_mode, logps_chunk=cfg.train.logps_chunk)
    run = Run(cfg=cfg, model_dir=Path(model_dir), tokenizer=tokenizer, mesh=mesh, graphdef=graphdef, state=state,
              step_cfg=step_cfg, tx=tx, schedule=schedule, train_examples=train_examples,
              eval_examples=eval_examples, sampler=sampler, total_steps=total, ref_mode=ref_mode,
              ref_train=None, ref_eval=None, model_config=model_config, data_report=report,
              buckets=data.bucket_lengths, pad_token=data.pad_id)
    if ref_mode == "precomputed":
        run.ref_train, run.ref_eval = precompute_reference(run, show)
    return run


def precompute_reference(run: Run, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference log-probs ``[N, 2]`` of the train and eval pairs (cached on disk)."""
    cfg = run.cfg
    cache_dir = Path(cfg.reference.cache_dir or Path(cfg.train.output_dir) / "ref_cache")
    settings = {"compute_dtype": cfg.train.dtype, "ref_dtype": cfg.reference.dtype}
    splits = {"train": examples_fingerprint(run.train_examples), "eval": examples_fingerprint(run.eval_examples)}
    key = cache_key(model_fingerprint(run.model_dir), splits, settings)
    bsz = cfg.reference.batch_pairs or micro_batch(cfg)
    rdt = DTYPES[cfg.reference.dtype]
    params = run.state.params
    if rdt != jnp.float32:
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(rdt), p))(params)
    fn = jax.jit(lambda p, r, b: row_logps(run.graphdef, p, r, b, cfg.train.logps_chunk))
    shards = batch_shardings(run.mesh, False, micro=False)

    def logps_fn(b):
        return fn(params, run.state.rest, {k: jax.device_put(v, shards[k]) for k, v in b.items()})

    def batches(examples):
        for plan in eval_plans(row_lengths(examples), bsz, bucket_lengths=run.buckets):
            yield plan.indices, plan.valid, batch_from_plan(examples, plan, run.pad_id)

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
    return {
        "sampler": run.sampler.state_dict(),
        "config": config_to_dict(run.cfg),
        "model_dir": str(run.model_dir),
        "train_fingerprint": examples_fingerprint(run.train_examples),
    }


def save_checkpoint(run: Run, ckpt: Checkpointer) -> None:
    step = int(jax.device_get(run.state.step))
    ckpt.save(step, run.state.checkpoint_tree(), _meta(run))


def restore_checkpoint(run: Run, ckpt: Checkpointer, step: int | None = None) -> int:
    """Restore policy, optimizer state, step and sampler position; returns the restored step."""
    step = ckpt.latest_step() if step is None else step
    tree, meta = ckpt.restore(step, run.state.checkpoint_tree())
    fp = meta.get("train_fingerprint")
    if fp is not None and fp != examples_fingerprint(run.train_examples):
        raise ConfigError(
            f"train.output_dir: {run.cfg.train.output_dir} holds a checkpoint trained on different data; "
            "use a new output_dir"
        )
    run.state = run.state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
    run.sampler.load_state_dict(meta["sampler"])
    return int(step)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, *, progress: bool | None = None) -> dict:
    """Train (or resume) per ``cfg``; returns ``{"final_step", "train_metrics", "eval_metrics", "export_dir"}``."""
    show = cfg.train.progress if progress is None else progress
    out = Path(cfg.train.output_dir)
    run = setup(cfg, progress=show)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        start = restore_checkpoint(run, ckpt)
    logger = MetricsLogger(out, tensorboard=cfg.train.tensorboard)
    bar = Progress(run.total_steps, initial=start, enabled=show)
    peak = flops_mod.peak_flops_per_device(_device_kind(), cfg.train.peak_tflops)
    n_dev = len(jax.devices())
    t = cfg.train
    last_train: dict = {}
    last_eval: dict = {}
    pending: list[tuple[int, Any]] = []
    window = {"flops": 0.0, "tokens": 0.0, "pairs": 0.0, "steps": 0, "t0": time.perf_counter()}
    try:
        for step in range(start, run.total_steps):
            batch, ref = run.next_global_batch()
            metrics = run.step(batch, ref)
            window["flops"] += run.flops(batch)
            window["steps"] += 1
            pending.append((step + 1, metrics))
            done = step + 1
            is_last = done == run.total_steps
            if done % t.log_every == 0 or is_last:
                host = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
                pending = []
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
                rec["epoch"] = done / run.sampler.steps_per_epoch
                for s_i, h in host[:-1]:
                    logger.log(s_i, h)
                last_train = logger.log(s, rec)
                bar.update(0, rec)
                window = {"flops": 0.0, "tokens": 0.0, "pairs": 0.0, "steps": 0, "t0": time.perf_counter()}
            bar.update(1)
            if t.eval_every and done % t.eval_every == 0 and not is_last and run.eval_examples:
                last_eval = logger.log(done, run.evaluate(t.eval_pairs), split="eval")
                bar.write(_eval_line(done, last_eval))
                window["t0"] = time.perf_counter()
            if t.save_every and done % t.save_every == 0 and not is_last:
                save_checkpoint(run, ckpt)
                window["t0"] = time.perf_counter()
        final_step = int(jax.device_get(run.state.step))
        if run.eval_examples:
            last_eval = logger.log(final_step, run.evaluate(t.eval_pairs), split="eval")
            bar.write(_eval_line(final_step, last_eval))
        if ckpt.latest_step() != final_step:
            save_checkpoint(run, ckpt)
        export_dir = None
        if t.export:
            export_dir = export_policy(run, out / "hf")
    finally:
        bar.close()
        logger.close()
        ckpt.close()
    return {"final_step": final_step, "train_metrics": last_train, "eval_metrics": last_eval,
            "export_dir": str(export_dir) if export_dir else None, "total_steps": run.total_steps}


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

    model = nnx.merge(run.graphdef, run.state.params, run.state.rest)
    save_pretrained(model, out_dir, tokenizer=run.tokenizer)
    return Path(out_dir)


