"""Roofline of poet_jax's preference train step on this machine.

1. The machine's dense matmul rate with XLA, measured in the same run: square fp32
   matmuls of several sizes, each repeated until ``--min-time`` seconds; the best
   sustained FLOP/s over sizes is the roof.
2. The FLOPs of a preference step: ``poet_jax.train.flops`` (policy forward + backward =
   3 forwards, plus the frozen reference's forward; real tokens only; each sequence's
   attention over the keys its mask allows: causal, or prompt + own response in the
   shared-prompt layout) — the *useful* count — and XLA's own ``cost_analysis()`` of the
   compiled step — the *executed* count, which includes padding slots, the masked scores
   of the blocked causal attention and elementwise work. :func:`executed_step_flops`
   predicts the latter from the same formulas, which is how the FLOP counter is checked
   against XLA (tests/test_bench_perf.py). XLA counts a ``while`` body once, so the
   executed count is taken with unrolled layers (``scan_layers=False``).
   ``--layout`` (default ``packed_shared``, as in compare_trl.py) picks the batch layout.
3. The achieved FLOP/s of the step (useful count / measured step time) as a fraction of
   the matmul roof.

    .venv/bin/python bench/roofline.py             # SmolLM2-135M, 4 pairs, max_length 512, 3 steps
    .venv/bin/python bench/roofline.py --quick     # tiny random Llama
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def matmul_rate(sizes=(1024, 2048, 3072, 4096), min_time: float = 1.0, dtype: str = "float32") -> dict[int, float]:
    """Sustained FLOP/s of ``[n, n] @ [n, n]`` per size (best of 3 timed runs of >= ``min_time`` s each)."""
    import jax

    out = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        t = time.perf_counter()
        f(a, b).block_until_ready()
        one = max(time.perf_counter() - t, 1e-6)
        reps = max(1, int(min_time / one))
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                c = f(a, b)
            c.block_until_ready()
            best = min(best, (time.perf_counter() - t) / reps)
        out[n] = 2.0 * n**3 / best
    return out


def xla_flops(compiled) -> float:
    """FLOPs of a compiled executable according to XLA's HLO cost analysis."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    if not ca or "flops" not in ca:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for this executable")
    return float(ca["flops"])


def executed_attention_pairs(length: int, block: int | None = None) -> float:
    """(query, key) scores the model's attention computes for one row of ``length`` slots.

    The default attention (``poet_jax.models.transformer.blocked_causal_attention``) runs query
    blocks of ``block`` slots against the keys up to the block's end (masking the rest), so
    it computes ``sum_i len_i * end_i`` scores, about ``(n+1)/(2n)`` of the full square.
    """
    from poet_jax.models.transformer import ATTN_BLOCK

    block = block or ATTN_BLOCK
    if length <= block:
        return float(length * length)
    return float(sum((min(s + block, length) - s) * min(s + block, length) for s in range(0, length, block)))


def executed_step_flops(model_config, rows: int, length: int, with_reference: bool) -> float:
    """FLOPs the hardware executes for a step on ``rows`` rows padded to ``length``.

    ``poet_jax.train.flops.preference_step_flops`` on ``rows`` rows of ``length`` slots (every
    slot, padding included), with its causal attention term (``n(n+1)/2`` scores per head)
    replaced by the scores the blocked attention really computes
    (:func:`executed_attention_pairs`, masked ones included).
    """
    from poet_jax.train import flops as F

    return F.preference_step_flops(model_config, [length] * rows, with_reference,
                                   attended=[executed_attention_pairs(length)] * rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, smaller matmuls, 2 steps")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--model-dir", default=None, help="HF model directory (default SmolLM2-135M-Instruct / tiny)")
    p.add_argument("--mode", default="a", choices=("a", "b", "c"), help="a DPO frozen ref, b +POET, c precomputed ref")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 4; quick 2)")
    p.add_argument("--max-length", type=int, default=None, help="default 512 (quick 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; quick 2) after one warm-up")
    p.add_argument("--full-rows", action="store_true",
                   help="make every row real up to the bucket length (no padding): the best case")
    p.add_argument("--remat", default="dots_no_batch", choices=("none", "full", "dots", "dots_no_batch"),
                   help="poet_jax model.remat (as in compare_trl.py); recomputation counts in XLA's number, not in "
                        "the useful one")
    p.add_argument("--logps-chunk", type=int, default=128, help="poet_jax train.logps_chunk (as in compare_trl.py)")
    p.add_argument("--layout", default="packed_shared", choices=("two_row", "shared_prompt", "packed", "packed_shared"),
                   help="poet_jax data.layout (as in compare_trl.py; --full-rows / --pad-to-max need two_row)")
    p.add_argument("--row-length", type=int, default=0, help="data.packed_row_length (0 = 2 * max_length)")
    p.add_argument("--pad-to-max", action="store_true", help="pad every batch to --max-length (one compiled shape;"
                   " default in --quick)")
    p.add_argument("--no-unrolled", action="store_true", help="skip the unrolled compile used for XLA's FLOP count")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.max_length = args.max_length or (256 if q else 512)
    args.steps = args.steps or (2 if q else 3)
    args.batch = args.batch or (2 if q else 4)
    args.pad_to_max = args.pad_to_max or (q and args.layout == "two_row")
    if args.layout != "two_row" and (args.full_rows or args.pad_to_max):
        raise SystemExit("--full-rows / --pad-to-max shape two_row batches; add --layout two_row")
    common.pin_threads(args.threads)

    import jax
    from transformers import AutoTokenizer

    from poet_jax.train import loop

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="poet_roofline_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or str(common.tiny_llama_dir(work / "tiny_llama") if q else common.smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_pairs = args.batch * (args.steps + 1)
    data = work / "pairs.json"
    common.select_pairs(tok, n_pairs, args.max_length, data, shortest=q)
    info = common.machine_info()

    sizes = (256, 512, 1024) if q else (1024, 2048, 3072, 4096)
    rates = matmul_rate(sizes, min_time=0.2 if q else 1.0)
    roof = max(rates.values())

    def build(scan: bool):
        cfg = common.poet_config(model_dir, data, batch=args.batch, max_length=args.max_length, mode=args.mode,
                                 lr=1e-6, out_dir=work / f"out_{int(scan)}", steps=args.steps + 1, scan_layers=scan,
                                 remat=args.remat, logps_chunk=args.logps_chunk, layout=args.layout,
                                 row_length=args.row_length)
        return loop.setup(cfg, progress=False)

    packed = args.layout != "two_row"

    def batch(run, step):
        """``(shape key, device arrays, rows, row length, real tokens, useful FLOPs)`` of a step."""
        idx = range(step * args.batch, (step + 1) * args.batch)
        if packed:
            pb, dev = common.device_packed_batch(run, idx)
            _, rows, length = pb["input_ids"].shape
            # real tokens, each sequence's attention over the keys its block mask allows
            return (rows, length), dev, rows, length, int((pb["segment_ids"] > 0).sum()), run.flops(pb)
        b, dev = common.device_batch(run, idx, pad_to=args.max_length if args.pad_to_max else None)
        if args.full_rows:
            b.attention_mask[:] = 1
            dev = {**dev, "attention_mask": jax.device_put(
                b.attention_mask.reshape(1, *b.attention_mask.shape), dev["attention_mask"].sharding)}
        # real tokens (all of them with --full-rows), causal attention
        return b.length, dev, b.input_ids.shape[0], b.length, int(b.attention_mask.sum()), run.flops(b)

    with_ref = args.mode != "c"
    run = build(scan=True)
    t = time.perf_counter()
    compiled = {}
    batches = [batch(run, s) for s in range(args.steps + 1)]
    for key, dev, *_ in batches:
        if key not in compiled:
            compiled[key] = run.train_fn().lower(run.state, dev).compile()
    compile_s = time.perf_counter() - t
    times, useful, executed = [], [], []
    for s, (key, dev, rows, length, _, flops) in enumerate(batches):
        t = time.perf_counter()
        run.state, metrics = compiled[key](run.state, dev)
        jax.block_until_ready((run.state.params, metrics))
        dt = time.perf_counter() - t
        if s == 0:
            continue  # warm-up
        times.append(dt)
        useful.append(flops)
        executed.append(executed_step_flops(run.model_config, rows, length, with_ref))

    xla_per_shape = {}
    if not args.no_unrolled:  # XLA's count of the same steps, from an unrolled compile
        del run
        urun = build(scan=False)
        for key, dev, *_ in batches[1:]:
            if key not in xla_per_shape:
                xla_per_shape[key] = xla_flops(urun.train_fn().lower(urun.state, dev).compile())
        xla = [xla_per_shape[key] for key, *_ in batches[1:]]
    else:
        xla = [float("nan")] * len(times)

    total_t = sum(times)
    achieved = sum(useful) / total_t
    executed_rate = sum(executed) / total_t
    frac = achieved / roof

    print(f"# roofline: {'quick ' if q else ''}model {model_dir}, mode {args.mode}, batch {args.batch} pairs, "
          f"max_length {args.max_length}, {args.threads} threads, {args.steps} timed steps after 1 warm-up, "
          f"remat {args.remat}, logps_chunk {args.logps_chunk}, layout {args.layout}"
          f"{', full rows' if args.full_rows else ''}")
    print(f"# {info['date']}, {info['cpu']} ({info['cores']} cores), load average {info['load_avg']}")
    print(common.fmt_table(["matmul n", "GFLOP/s"], [[n, "%.1f" % (r / 1e9)] for n, r in rates.items()]))
    print()
    rows = []
    for i, ((_, _, nrows, length, real, _), dt) in enumerate(zip(batches[1:], times)):
        rows.append([i + 1, f"{nrows}x{length}", real, "%.1f" % (useful[i] / 1e9),
                     "%.1f" % (executed[i] / 1e9), "%.1f" % (xla[i] / 1e9),
                     "%.3f" % (xla[i] / executed[i]) if xla[i] == xla[i] else "n/a", "%.2f" % dt,
                     "%.1f" % (useful[i] / dt / 1e9), "%.0f%%" % (100 * useful[i] / dt / roof)])
    print(common.fmt_table(["step", "rows x L", "real tokens", "useful GFLOP", "executed GFLOP (formula)", "XLA GFLOP",
                            "XLA/formula", "s", "useful GFLOP/s", "of roof"], rows))
    print(f"\nroof (best matmul) {roof / 1e9:.1f} GFLOP/s; step: useful {achieved / 1e9:.1f} GFLOP/s = "
          f"{100 * frac:.1f}% of roof, executed {executed_rate / 1e9:.1f} GFLOP/s = {100 * executed_rate / roof:.1f}%"
          f" of roof; compile {compile_s:.1f} s; peak RSS {common.peak_rss_mib():.0f} MiB; "
          f"load average at end {common.load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "args": vars(args), "matmul_flops": {str(k): v for k, v in rates.items()}, "roof": roof,
            "step_seconds": times, "useful_flops": useful, "executed_flops": executed, "xla_flops": xla,
            "fraction_of_roof": frac, "compile_s": compile_s,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
