"""Shared-prompt rows and padding-free packing vs the plain two-row layout: tokens and step time.

The same preference pairs (dpo_en_demo.json, SmolLM2 tokenizer + ChatML template, truncated
to ``--max-length``) go through four layouts:

- ``plain``: two rows per pair ([prompt+chosen], [prompt+rejected]), right-padded to one
  bucket (a multiple of 64) — ``PreferenceBatch``, what the trainer does today;
- ``shared``: one row per pair, [prompt | chosen | rejected] with the block mask (the
  prompt computed once), rows padded to a multiple of 64;
- ``packed``: several pairs per row in the two-row layout (two sequences per pair), first-fit
  decreasing into rows of ``--row-length`` slots, at most ``--max-pairs-per-row`` pairs per row;
- ``packed_shared``: both.

For each: slots per pair (tokens the forward pass processes, padding included), real tokens
per pair, padding fraction, compile time, and the median time of a DPO step's compute (policy
forward + backward of the DPO loss, plus a reference forward; no optimizer update), fp32, jit:
every layout is compiled first, then timed round-robin ``--steps`` times (so load drifts on a
shared machine hit every layout alike) and the median is reported.
The DPO loss of each layout is checked against the plain one (it must agree to ~1e-5).

Usage: python bench/bench_packing.py [--quick] [--model tiny|small|smollm2] [--pairs N] [--shortest]
       [--max-length L] [--row-length R] [--max-pairs-per-row M] [--steps S] [--logps-chunk C]
       [--poet off|on|both]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

MODELS = {  # random Llama shapes over SmolLM2's vocabulary (the real one: --model smollm2)
    "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
}


def _round_up(n: int, m: int = 64) -> int:
    return -(-n // m) * m


def load_pairs(tokenizer, n_pairs: int, max_length: int, shortest: bool = False):
    """The first ``n_pairs`` records (``shortest``: the shortest of all 300), truncated to ``max_length``."""
    from poet_jax.data import DataConfig, build_preference_data

    cfg = DataConfig(path=str(common.SHARED_DATA / "dpo_en_demo.json"), max_length=max_length,
                     max_prompt_length=max_length // 2, show_progress=False,
                     max_records=None if shortest else n_pairs, bucket_lengths=())
    exs = build_preference_data(cfg, tokenizer).train_examples
    if shortest:
        exs = sorted(exs, key=lambda e: (e.row_length, e.record))[:n_pairs]
        exs.sort(key=lambda e: e.record)
    return exs[:n_pairs]


def make_model(name: str, vocab: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from poet_jax.models import CausalLM, ModelConfig, from_pretrained

    if name == "smollm2":
        return from_pretrained(str(common.smollm2_dir()))
    cfg = ModelConfig(vocab_size=vocab, rope_theta=1e5, **MODELS[name])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rs = np.random.RandomState(0)

    def draw(path, a):  # numpy init: no eager per-op compiles
        return jnp.asarray(rs.normal(0.0, 0.02, a.shape).astype(np.float32) + ("norm" in jax.tree_util.keystr(path)))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def layouts(examples, pad_id: int, max_length: int, row_length: int, max_pairs: int) -> dict:
    """name -> (kind, host batch, slots, real tokens)."""
    from poet_jax.data import default_bucket_lengths, make_batch
    from poet_jax.data.packing import make_packed_batch, pack_pairs, pair_tokens

    idx = list(range(len(examples)))
    out = {}
    plain = make_batch(examples, idx, default_bucket_lengths(max_length, multiple=64), pad_id)
    out["plain"] = ("plain", plain, plain.input_ids.size, int(plain.attention_mask.sum()))
    longest = max(pair_tokens(e, True) for e in examples)
    for name, shared, m, length in (
        ("shared", True, 1, _round_up(longest)),
        ("packed", False, max_pairs, row_length),
        ("packed_shared", True, max_pairs, row_length),
    ):
        plan = pack_pairs(examples, idx, num_rows=None, row_length=length, max_pairs_per_row=m, shared_prompt=shared)
        pb = make_packed_batch(examples, plan, pad_id, row_length=length, shared_prompt=shared)
        out[name] = ("packed", pb, pb.input_ids.size, pb.num_real_tokens)
    return out


def step_fns(graphdef, chunk: int):
    """Jitted ``(params, ref_params, batch) -> (loss, grads)`` for the plain and packed layouts.

    Token log-probs are computed ``chunk`` positions at a time (at most ``[rows, chunk, V]``
    logits live) in both, as the trainer's ``logps_chunk`` does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from poet_jax import losses
    from poet_jax.train.packed import packed_sequence_logps

    def plain_logps(params, b):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(b["input_ids"], b["attention_mask"])[:, :-1]
        tlp = losses.token_logps_from_hidden(hidden, b["input_ids"][:, 1:], model.logits_from_hidden, chunk_size=chunk)
        lp = losses.sequence_logps(tlp, b["response_mask"][:, 1:])
        n = lp.shape[0] // 2
        return lp[:n], lp[n:], b["pair_valid"]

    def packed_logps(params, b):
        c, r, _, _ = packed_sequence_logps(nnx.merge(graphdef, params), b, chunk=chunk)
        return c, r, b["pair_valid"].reshape(-1)

    def make(logps_fn):
        def step(params, ref_params, b):
            rc, rr, _ = jax.tree.map(jax.lax.stop_gradient, logps_fn(ref_params, b))

            def loss_fn(p):
                c, r, valid = logps_fn(p, b)
                loss, _ = losses.dpo_loss(c, r, rc, rr, beta=0.1)
                v = valid.astype(jnp.float32)
                return jnp.sum(loss * v) / jnp.sum(v)

            return jax.value_and_grad(loss_fn)(params)

        return jax.jit(step)

    return {"plain": make(plain_logps), "packed": make(packed_logps)}


def run(args) -> dict:
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from poet_jax.data import poet_truncate_example

    tok = AutoTokenizer.from_pretrained(str(common.smollm2_dir()))
    base = load_pairs(tok, args.pairs, args.max_length, args.shortest)
    model = make_model(args.model, len(tok))
    graphdef, params = nnx.split(model)
    ref_params = jax.tree.map(lambda x: x * 0.97, params)  # a different reference: the loss is not ln 2
    fns = step_fns(graphdef, args.logps_chunk)
    results, runs = [], []
    for poet in {"off": [False], "on": [True], "both": [False, True]}[args.poet]:
        exs = [poet_truncate_example(e) for e in base] if poet else base
        for name, (kind, hb, slots, real) in layouts(exs, tok.pad_token_id, args.max_length, args.row_length,
                                                      args.max_pairs_per_row).items():
            batch = jax.device_put(hb.as_dict())
            t0 = time.perf_counter()
            compiled = fns[kind].lower(params, ref_params, batch).compile()
            compile_s = time.perf_counter() - t0
            results.append({
                "poet": poet, "layout": name, "shape": list(hb.input_ids.shape), "pairs": len(exs),
                "slots_per_pair": slots / len(exs), "real_tokens_per_pair": real / len(exs),
                "padding_fraction": 1.0 - real / slots, "compile_s": compile_s, "times": [],
            })
            runs.append((compiled, batch))
    # round-robin timing: every layout once per round, so slow drifts of a shared machine's load
    # hit all layouts alike; the median over rounds is reported
    for _ in range(args.steps):
        for res, (compiled, batch) in zip(results, runs):
            t0 = time.perf_counter()
            loss, grads = compiled(params, ref_params, batch)
            jax.block_until_ready((loss, grads))
            res["times"].append(time.perf_counter() - t0)
            res["loss"] = float(loss)
    for res in results:
        res["step_s"] = statistics.median(res["times"])
        plain = next(x for x in results if x["poet"] == res["poet"] and x["layout"] == "plain")
        res["loss_diff_vs_plain"] = abs(res["loss"] - plain["loss"])
        print(json.dumps(res), flush=True)
    for r in results:
        plain = next(x for x in results if x["poet"] == r["poet"] and x["layout"] == "plain")
        r["speedup_vs_plain"] = plain["step_s"] / r["step_s"]
        r["slots_vs_plain"] = r["slots_per_pair"] / plain["slots_per_pair"]
    bad = [r for r in results if r["loss_diff_vs_plain"] > 1e-4 * max(1.0, abs(r["loss"]))]
    if bad:
        raise SystemExit(f"layouts disagree with the plain path: {bad}")
    return {"machine": common.machine_info(), "args": vars(args), "results": results}


def table(out: dict) -> str:
    rows = [[("on" if r["poet"] else "off"), r["layout"], "x".join(map(str, r["shape"])), "%.1f" % r["slots_per_pair"],
             "%.1f" % r["real_tokens_per_pair"], "%.2f" % r["padding_fraction"], "%.1f" % r["compile_s"],
             "%.3f" % r["step_s"], "%.2fx" % r["speedup_vs_plain"], "%.1e" % r["loss_diff_vs_plain"]]
            for r in out["results"]]
    return common.fmt_table(["POET", "layout", "rows x L", "slots/pair", "real tok/pair", "pad frac", "compile s",
                             "step s", "speed vs plain", "|dloss|"], rows, "llllrrrrrr")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, the 6 shortest pairs, max_length 256, rows of 256, 1 round, POET off")
    ap.add_argument("--model", choices=["tiny", "small", "smollm2"], default="small")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--row-length", type=int, default=None, help="packed row slots (default 2 * max_length)")
    ap.add_argument("--max-pairs-per-row", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timing rounds (median reported)")
    ap.add_argument("--logps-chunk", type=int, default=64, help="positions per log-prob chunk (both paths)")
    ap.add_argument("--shortest", action="store_true", help="the shortest pairs of the file, not the first")
    ap.add_argument("--poet", choices=["off", "on", "both"], default="both")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.pairs, args.max_length, args.steps, args.poet = "tiny", 6, 256, 1, "off"
        args.shortest, args.row_length = True, args.row_length or 256
    if args.row_length is None:
        args.row_length = 2 * args.max_length
    out = run(args)
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
