"""poet_jax's train step against TRL's DPOTrainer, side by side, on the same pairs and CPUs.

One command, one run. For each mode both trainers run in their own subprocess, pinned to
the same ``--threads`` CPUs (CPU affinity, which XLA's CPU thread pools follow, plus
``torch.set_num_threads`` and OMP/MKL variables for PyTorch). The parent sends "step"
commands alternately (TRL first on even steps, poet_jax first on odd ones), so a change
in machine load hits both sides alike, and only one side computes at any time.

Setup is identical: the same model weights (fp32, CPU), the same pairs of
dpo_en_demo.json in the same order (the first ``--pairs`` that fit ``--max-length``
tokens, so neither side truncates), ``--batch`` pairs per step, AdamW with the same lr
(constant), gradient clipping 1.0, no weight decay, DPO beta 0.1. Memory options:
TRL without gradient checkpointing (its default is on; ``--trl-gradient-checkpointing``),
poet_jax with ``--remat dots_no_batch`` (keeps the weight-matmul outputs, recomputes
attention and elementwise work in the backward pass) and log-probs in chunks of
``--logps-chunk`` positions. Batch layout: TRL pads ``[prompt+chosen]`` and
``[prompt+rejected]`` rows to the longest row of the batch; poet_jax runs its default
benchmark layout ``--layout packed_shared`` (each pair as one ``[prompt|chosen|rejected]``
sequence, the prompt computed once, several pairs packed into rows of ``--row-length``
slots with a block attention mask; same per-pair log-probs, tested in
tests/test_train_packed.py); ``--layout two_row`` gives TRL's layout. TRL tokenizes the
records itself; its token ids are checked equal to poet_jax's.

Modes:
  a  DPO, frozen reference                (TRL: DPOTrainer with ref_model)
  b  DPO+POET, frozen reference           (TRL: ld_alpha=0.0 masks the tail; poet_jax cuts it physically)
  c  DPO, precomputed reference (poet_jax only; compared with TRL mode a)

Warm-up (``--warmup`` steps; poet_jax also compiles every batch shape ahead of time) is
excluded from the rates and reported separately. Reported per side: pairs/s and
tokens/s over the measured steps (tokens = real tokens of the untruncated pairs, the
same numerator for both sides), the peak RSS of the subprocess, and poet_jax / TRL.
Since both sides see the same batches, the loss of every step is also compared.

    .venv/bin/python bench/compare_trl.py                 # SmolLM2-135M, 64 pairs, batch 4, L=512
    .venv/bin/python bench/compare_trl.py --quick         # tiny random Llama, 8 shortest pairs, L=256, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = {
    "a": "DPO, frozen ref",
    "b": "DPO+POET, frozen ref",
    "c": "DPO, precomputed ref",
}


# ============================================================================ workers


class Proto:
    """Line-delimited JSON over the worker's original stdout (library prints go to stderr)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **msg):
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def recv(self) -> list[str]:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("parent closed the pipe")
        return line.split()


def _batch_indices(step: int, batch: int) -> list[int]:
    return list(range(step * batch, (step + 1) * batch))


def worker_poet(args, proto: Proto) -> None:
    import jax
    import numpy as np

    from poet_jax.train import loop

    t0 = time.perf_counter()
    cfg = common.poet_config(args.model_dir, args.data, batch=args.batch, max_length=args.max_length, mode=args.mode,
                             lr=args.lr, out_dir=args.out_dir, steps=args.steps, bucket_multiple=args.bucket_multiple,
                             logps_chunk=args.logps_chunk, remat=args.remat, layout=args.layout,
                             row_length=args.row_length, max_pairs_per_row=args.max_pairs_per_row)
    timing = {"precompute_s": 0.0}
    orig = loop.precompute_reference

    def timed_precompute(*a, **k):
        s = time.perf_counter()
        out = orig(*a, **k)
        timing["precompute_s"] = time.perf_counter() - s
        return out

    loop.precompute_reference = timed_precompute
    run = loop.setup(cfg, progress=False)
    loop.precompute_reference = orig
    examples = run.train_examples
    if [e.record for e in examples] != list(range(len(examples))):
        raise RuntimeError("poet_jax reordered or dropped pairs of the benchmark file")
    setup_s = time.perf_counter() - t0

    packed = args.layout != "two_row"

    def device_batch(step):
        """``(shape key, device arrays, computed slots, real tokens, FLOPs)`` of a step's batch."""
        idx = _batch_indices(step, args.batch)
        if packed:
            pb, dev = common.device_packed_batch(run, idx)
            ids = pb["input_ids"]
            return tuple(ids.shape[1:]), dev, int(ids.size), int((pb["segment_ids"] > 0).sum()), run.flops(pb)
        b, dev = common.device_batch(run, idx)
        return b.length, dev, int(np.prod(b.input_ids.shape)), int(b.attention_mask.sum()), run.flops(b)

    # every batch on the device and every batch shape compiled ahead of time (excluded from the step times,
    # as TRL's collated batch is ready before its on_step_begin)
    t1 = time.perf_counter()
    batches = [device_batch(s) for s in range(args.steps)]
    compiled = {}
    for key, dev, *_ in batches:
        if key not in compiled:
            compiled[key] = run.train_fn().lower(run.state, dev).compile()
    compile_s = time.perf_counter() - t1
    ids = [[e.prompt_ids.tolist(), e.chosen_ids.tolist(), e.rejected_ids.tolist()] for e in examples]
    proto.send(event="ready", setup_s=setup_s, compile_s=compile_s, precompute_s=timing["precompute_s"],
               ids=ids, shapes=sorted(compiled), peak_rss_mib=common.peak_rss_mib())

    while True:
        cmd = proto.recv()
        if cmd[0] == "exit":
            break
        step = int(cmd[1])
        ts = time.perf_counter()
        key, dev, computed, real, flops = batches[step]
        run.state, metrics = compiled[key](run.state, dev)
        loss = float(jax.device_get(metrics["loss"]))
        jax.block_until_ready(run.state.params)
        secs = time.perf_counter() - ts
        proto.send(event="step", step=step, seconds=secs, loss=loss, length=key, computed_tokens=computed,
                   model_tokens=real, flops=flops, peak_rss_mib=common.peak_rss_mib())
    proto.send(event="done", peak_rss_mib=common.peak_rss_mib())


def worker_trl(args, proto: Proto) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ds = Dataset.from_list(json.loads(Path(args.data).read_text()))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    cfg = DPOConfig(
        output_dir=args.out_dir, per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, max_length=args.max_length, beta=0.1, loss_type=["sigmoid"],
        ld_alpha=0.0 if args.mode == "b" else None, gradient_checkpointing=args.trl_gradient_checkpointing,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    state = {"t0": 0.0, "t1": 0.0, "step": -1}

    class Interleave(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            cmd = proto.recv()
            if cmd[0] != "step":
                raise SystemExit(f"unexpected command {cmd}")
            state["step"] = int(cmd[1])
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, st, control, **kw):
            state["t1"] = time.perf_counter()

        def on_log(self, a, st, control, logs=None, **kw):
            if logs and "loss" in logs and "train_loss" not in logs:
                proto.send(event="step", step=state["step"], seconds=state["t1"] - state["t0"],
                           loss=float(logs["loss"]), peak_rss_mib=common.peak_rss_mib())

    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Interleave()])
    ids = [[list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])] for r in trainer.train_dataset]
    setup_s = time.perf_counter() - t0
    proto.send(event="ready", setup_s=setup_s, compile_s=0.0, precompute_s=0.0, ids=ids, shapes=[],
               peak_rss_mib=common.peak_rss_mib())
    trainer.train()
    cmd = proto.recv()
    if cmd[0] != "exit":
        raise SystemExit(f"unexpected command {cmd}")
    proto.send(event="done", peak_rss_mib=common.peak_rss_mib())


# ============================================================================ parent


class Worker:
    def __init__(self, side: str, mode: str, args, work: Path):
        self.side, self.mode = side, mode
        self.log = work / f"{side}_{mode}.log"
        out_dir = work / f"out_{side}_{mode}"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", side, "--mode", mode,
            "--model-dir", str(args.model_dir), "--data", str(args.data), "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--threads", str(args.threads),
            "--steps", str(args.warmup + args.steps), "--out-dir", str(out_dir),
            "--bucket-multiple", str(args.bucket_multiple), "--logps-chunk", str(args.logps_chunk),
            "--remat", args.remat, "--layout", args.layout, "--row-length", str(args.row_length),
            "--max-pairs-per-row", str(args.max_pairs_per_row),
        ]
        if args.trl_gradient_checkpointing:
            cmd.append("--trl-gradient-checkpointing")
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w"), text=True, bufsize=1, env=env)

    def recv(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = self.log.read_text()[-4000:]
                raise RuntimeError(f"{self.side} worker (mode {self.mode}) exited with {self.proc.returncode}:\n{tail}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> dict:
        self.send("exit")
        msg = self.recv()
        self.proc.wait(timeout=120)
        return msg


def check_ids(side_ids: list, examples: list, poet: bool, side: str) -> None:
    """Token ids of a worker equal poet_jax's pipeline (POET: the worker may cut to k = min length)."""
    if len(side_ids) != len(examples):
        raise RuntimeError(f"{side}: {len(side_ids)} pairs, expected {len(examples)}")
    for i, ((p, c, r), e) in enumerate(zip(side_ids, examples)):
        ec, er = e.chosen_ids.tolist(), e.rejected_ids.tolist()
        if poet and side == "poet_jax":
            k = min(len(ec), len(er))
            ec, er = ec[:k], er[:k]
        if p != e.prompt_ids.tolist() or c != ec or r != er:
            raise RuntimeError(f"{side}: token ids of pair {i} differ from poet_jax.data's")


def start_mode(mode: str, args, work: Path) -> dict[str, Worker]:
    sides = ["trl", "poet_jax"] if mode in ("a", "b") else ["poet_jax"]
    return {s: Worker("poet" if s == "poet_jax" else "trl", mode, args, work) for s in sides}


def run_mode(mode: str, workers: dict[str, Worker], args, examples: list, on_ready=None) -> dict:
    """Wait for the mode's workers, run the interleaved steps, collect rates and peak memory.

    ``on_ready`` is called once every worker of this mode has finished its setup (the
    quick mode starts the next mode's workers then, overlapping their setup).
    """
    from poet_jax.data.packing import pair_tokens  # real tokens of a pair's two rows (untruncated)

    sides = list(workers)
    res = {s: {"steps": []} for s in sides}
    try:
        for s, w in workers.items():
            msg = w.recv()
            check_ids(msg.pop("ids"), examples, mode == "b", s)
            res[s].update(msg)
        if on_ready is not None:
            on_ready()
        total = args.warmup + args.steps
        for step in range(total):
            order = sides if step % 2 == 0 else sides[::-1]
            for s in order:
                workers[s].send(f"step {step}")
                msg = workers[s].recv()
                if msg.get("event") != "step" or msg["step"] != step:
                    raise RuntimeError(f"{s}: unexpected reply {msg}")
                res[s]["steps"].append(msg)
                if args.verbose:
                    print(f"  mode {mode} step {step} {s}: {msg['seconds']:.2f}s loss {msg['loss']:.6f}", flush=True)
        for s, w in workers.items():
            try:
                res[s]["peak_rss_mib"] = w.close()["peak_rss_mib"]
            except (OSError, RuntimeError) as err:  # died after its last step (e.g. the OOM killer)
                print(f"# warning: {s} worker of mode {mode} did not exit cleanly ({type(err).__name__}); "
                      "peak RSS from its last step report", flush=True)
                res[s]["peak_rss_mib"] = res[s]["steps"][-1]["peak_rss_mib"]
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    for s in sides:
        meas = res[s]["steps"][args.warmup:]
        secs = sum(m["seconds"] for m in meas)
        pairs = args.batch * len(meas)
        tokens = sum(pair_tokens(examples[i], False) for m in meas for i in _batch_indices(m["step"], args.batch))
        res[s].update(
            measured_s=secs, pairs_per_s=pairs / secs, tokens_per_s=tokens / secs,
            warmup_s=sum(m["seconds"] for m in res[s]["steps"][: args.warmup]),
        )
    return res


def summarize(results: dict, args) -> tuple[str, list[dict]]:
    rows, recs = [], []
    for mode, res in results.items():
        trl = res.get("trl") or results.get("a", {}).get("trl")
        for side in ("trl", "poet_jax"):
            if side not in res:
                continue
            r = res[side]
            ratio = r["pairs_per_s"] / trl["pairs_per_s"] if side == "poet_jax" and trl else None
            mem = r["peak_rss_mib"] / trl["peak_rss_mib"] if side == "poet_jax" and trl else None
            rec = {
                "mode": mode, "side": side, "pairs_per_s": r["pairs_per_s"], "tokens_per_s": r["tokens_per_s"],
                "s_per_step": r["measured_s"] / args.steps, "peak_rss_mib": r["peak_rss_mib"],
                "setup_s": r["setup_s"], "compile_s": r["compile_s"], "precompute_s": r["precompute_s"],
                "warmup_s": r["warmup_s"], "speedup_vs_trl": ratio, "mem_vs_trl": mem,
                "losses": [m["loss"] for m in r["steps"]],
            }
            recs.append(rec)
            rows.append([
                f"{mode} {MODES[mode]}", side, "%.3f" % r["pairs_per_s"], "%.0f" % r["tokens_per_s"],
                "%.2f" % rec["s_per_step"], "%.0f" % r["peak_rss_mib"],
                "%.1f / %.1f" % (r["compile_s"] + r["precompute_s"], r["warmup_s"]),
                "" if ratio is None else "%.2fx" % ratio, "" if mem is None else "%.2f" % mem,
            ])
    table = common.fmt_table(
        ["mode", "trainer", "pairs/s", "tokens/s", "s/step", "peak RSS MiB", "compile+precompute / warm-up s",
         "speed vs TRL", "mem vs TRL"], rows, "llrrrrrrr")
    return table, recs


def loss_agreement(results: dict) -> list[str]:
    lines = []
    for mode, res in results.items():
        if "trl" in res and "poet_jax" in res:
            a = [m["loss"] for m in res["trl"]["steps"]]
            b = [m["loss"] for m in res["poet_jax"]["steps"]]
            d = max(abs(x - y) for x, y in zip(a, b))
            lines.append(f"mode {mode}: per-step loss TRL {['%.5f' % x for x in a]} poet_jax {['%.5f' % x for x in b]}"
                         f" (max |diff| {d:.2e})")
    return lines


def parent(args) -> int:
    from transformers import AutoTokenizer

    t_all = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="poet_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        args.model_dir = str(common.tiny_llama_dir(work / "tiny_llama") if args.quick else common.smollm2_dir())
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    need = (args.warmup + args.steps) * args.batch
    if need > args.pairs:
        raise SystemExit(f"--warmup + --steps ({args.warmup + args.steps}) steps of {args.batch} pairs need "
                         f"{need} pairs but --pairs is {args.pairs}")
    records, examples = common.select_pairs(tok, args.pairs, args.max_length, work / "pairs.json",
                                            shortest=args.quick)
    # the workers get only the pairs the steps use (in order), so the precomputed reference
    # pass of mode c covers exactly those
    args.data = str(work / "pairs_run.json")
    Path(args.data).write_text(json.dumps(records[:need]))
    examples = examples[:need]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {bad}; choose from {sorted(MODES)}")
    info = common.machine_info()
    print(f"# compare_trl: {'quick ' if args.quick else ''}model {args.model_dir}, {args.pairs} pairs, batch "
          f"{args.batch}, max_length {args.max_length}, {args.threads} threads, warm-up {args.warmup} + "
          f"{args.steps} measured steps, lr {args.lr}, TRL gradient checkpointing {args.trl_gradient_checkpointing}, "
          f"poet_jax remat {args.remat}, logps_chunk {args.logps_chunk}, layout {args.layout}"
          + (f" (rows of up to {args.row_length or 2 * args.max_length} slots cut to multiples of 128, "
             f"<= {args.max_pairs_per_row} pairs/row)"
             if args.layout != "two_row" else f", buckets multiple of {args.bucket_multiple}"))
    print(f"# {info['date']}, {info['cpu']} ({info['cores']} cores), load average {info['load_avg']} at start",
          flush=True)
    results = {}
    pending = {modes[0]: start_mode(modes[0], args, work)}
    try:
        for i, m in enumerate(modes):
            nxt = modes[i + 1] if i + 1 < len(modes) else None

            def start_next(nxt=nxt):
                if nxt is not None and args.overlap_setup:
                    pending[nxt] = start_mode(nxt, args, work)

            results[m] = run_mode(m, pending.pop(m), args, examples, on_ready=start_next)
            if args.json:  # partial results after every mode
                Path(args.json + ".partial").write_text(json.dumps(results, default=str))
            print(summarize({m: results[m]} if m != "c" or "a" not in results else {"a": results["a"], m: results[m]},
                            args)[0], flush=True)
            if nxt is not None and nxt not in pending:
                pending[nxt] = start_mode(nxt, args, work)
    finally:
        for ws in pending.values():
            for w in ws.values():
                w.proc.kill()
    table, recs = summarize(results, args)
    end_load = common.load_average()
    print(table)
    for line in loss_agreement(results):
        print("# " + line)
    for m, res in results.items():
        p = res["poet_jax"]
        print(f"# mode {m}: poet_jax batch shapes {p['shapes']}")
    print(f"# load average at end {end_load}; total {time.perf_counter() - t_all:.0f} s; work dir {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "end_load_avg": end_load, "args": vars(args),
                                               "results": recs, "raw": results}, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, the 8 shortest pairs, max_length 256, 2 steps")
    p.add_argument("--modes", default="a,b,c", help="comma-separated modes (a, b, c)")
    p.add_argument("--pairs", type=int, default=None, help="pairs selected from dpo_en_demo.json (default 64; quick 8)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per row (default 512; quick 256)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps (excluded)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 5; quick 1)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per side")
    p.add_argument("--bucket-multiple", type=int, default=64, help="poet_jax pads rows to a multiple of this")
    p.add_argument("--logps-chunk", type=int, default=128,
                   help="poet_jax train.logps_chunk: sequence positions per log-prob chunk (0 = whole sequence)")
    p.add_argument("--remat", default="dots_no_batch", choices=("none", "full", "dots", "dots_no_batch"),
                   help="poet_jax model.remat (dots_no_batch: keep weight-matmul outputs, recompute attention "
                        "and elementwise work; SmolLM2 at 4x512: 3.4 GiB of XLA temporaries instead of 13.4 with none)")
    p.add_argument("--layout", default="packed_shared", choices=("two_row", "shared_prompt", "packed", "packed_shared"),
                   help="poet_jax data.layout (packed_shared: several [prompt|chosen|rejected] pairs per row, no "
                        "padding between them; two_row: TRL's layout, [prompt+chosen], [prompt+rejected])")
    p.add_argument("--row-length", type=int, default=0,
                   help="poet_jax data.packed_row_length (slots per packed row; 0 = 2 * max_length)")
    p.add_argument("--max-pairs-per-row", type=int, default=4, help="poet_jax data.max_pairs_per_row")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off = like poet_jax")
    p.add_argument("--overlap-setup", action="store_true",
                   help="start the next mode's workers while this mode measures (default in --quick only: "
                        "their setup then competes with the measured steps)")
    p.add_argument("--model-dir", default=None, help="HF model directory (default SmolLM2-135M-Instruct / tiny)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print every step as it finishes")
    # worker-only
    p.add_argument("--worker", choices=("trl", "poet"), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="a", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.pin_threads(args.threads)
        proto = Proto()
        (worker_poet if args.worker == "poet" else worker_trl)(args, proto)
        return 0
    q = args.quick
    args.pairs = args.pairs or (8 if q else 64)
    args.max_length = args.max_length or (256 if q else 512)
    args.steps = args.steps or (1 if q else 5)
    args.overlap_setup = args.overlap_setup or q
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
