"""Trainer benchmark on the tiny CPU config (configs/tiny/dpo.yaml): compile time, steps/s, compiles per epoch.

    .venv/bin/python bench/bench_train.py [--quick] [--config configs/tiny/dpo.yaml] [--json out.json] [key=value ...]

Runs ``poet_jax.train.loop.setup`` on the config (a tiny random Llama created locally, the
real pairs of ../shared/data/dpo_en_demo.json), then one epoch of optimizer steps, and
reports: the first step's wall time (trace + XLA compile + run), the number of XLA
compilations and their total time over the epoch (one per bucket length is expected),
steady-state steps/s, pairs/s and tokens/s (steps after the last compile), and one
held-out evaluation. ``--quick`` uses 32 records and 4 steps (for tests/test_train_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) and their durations."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax.monitoring

        self.count = 0
        self.seconds = 0.0
        self.active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **_kw):
        if self.active and name == self.EVENT:
            self.count += 1
            self.seconds += float(duration)


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "dpo.yaml"))
    p.add_argument("--quick", action="store_true", help="32 records, 4 steps (smoke test)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)

    import jax

    from poet_jax.train.config import load_config
    from poet_jax.train.loop import setup

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
    overrides = [f"train.output_dir={tmp / 'run'}", f"model.path={tmp / 'model'}", f"data.path={data}",
                 "train.progress=false", "train.tensorboard=false"]
    if args.quick:
        overrides += ["data.max_records=32"]
    cfg = load_config(args.config, overrides + list(args.overrides))

    counter = CompileCounter()
    t0 = time.perf_counter()
    run_ = setup(cfg, progress=False)
    setup_s = time.perf_counter() - t0
    counter.count, counter.seconds = 0, 0.0  # count the training compiles only
    steps = run_.sampler.steps_per_epoch if not args.quick else min(4, run_.sampler.steps_per_epoch * 2)
    step_times, compiles_at, pairs, tokens, shapes = [], [], [], [], set()
    for i in range(steps):
        before = counter.count
        batch, ref = run_.next_global_batch()
        t = time.perf_counter()
        m = run_.step(batch, ref)
        jax.block_until_ready(m["loss"])
        step_times.append(time.perf_counter() - t)
        compiles_at.append(counter.count - before)
        if isinstance(batch, dict):  # packed / shared-prompt layouts: real slots of the rows
            pairs.append(int(batch["pair_valid"].sum()))
            tokens.append(int((batch["segment_ids"] > 0).sum()))
            shapes.add(tuple(batch["input_ids"].shape))
        else:
            pairs.append(int(batch.pair_valid.sum()))
            tokens.append(int(batch.attention_mask.sum()))
            shapes.add(tuple(batch.input_ids.shape))
    train_compiles, train_compile_s = counter.count, counter.seconds
    steady = [i for i in range(steps) if compiles_at[i] == 0]
    steady_s = sum(step_times[i] for i in steady)
    t = time.perf_counter()
    ev = run_.evaluate()
    eval_s = time.perf_counter() - t
    result = {
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "overrides": list(args.overrides),
        "quick": args.quick,
        "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        "train_pairs": len(run_.train_examples),
        "steps": steps,
        "global_batch": cfg.train.global_batch,
        "micro_batch": cfg.train.micro_batch or cfg.train.global_batch,
        "setup_s": round(setup_s, 2),
        "first_step_s": round(step_times[0], 2),
        "train_compiles": train_compiles,
        "train_compile_s": round(train_compile_s, 2),
        "bucket_lengths": list(run_.buckets or ()),
        "batch_shapes": sorted(shapes),
        "steady_steps": len(steady),
        "steady_steps_per_s": round(len(steady) / steady_s, 3) if steady_s else None,
        "steady_pairs_per_s": round(sum(pairs[i] for i in steady) / steady_s, 2) if steady_s else None,
        "steady_tokens_per_s": round(sum(tokens[i] for i in steady) / steady_s, 1) if steady_s else None,
        "eval_pairs": len(run_.eval_examples),
        "eval_s_incl_compile": round(eval_s, 2),
        "final_train_loss": round(float(m["loss"]), 4),
        "eval_loss": round(ev.get("loss", float("nan")), 4) if ev else None,
    }
    counter.active = False
    try:
        from bench.common import machine_info

        result["machine"] = machine_info()
    except Exception:  # pragma: no cover - informational only
        pass
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    for k, v in result.items():
        if k != "machine":
            print(f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
