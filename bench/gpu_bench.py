"""GPU throughput of poet_jax's preference train step: a ~1B Llama-3-shaped model, bf16, L=2048.

Run through ``bash bench/gpu.sh`` (it installs jax[cuda12] when needed and bounds the time).
The model has random weights (no download) with the shape of Llama-3.2-1B: hidden 2048,
16 layers, 32 query / 8 key-value heads of 64, MLP 8192, vocabulary 128,256, tied
embeddings (1.24 B parameters). Compute in bf16, fp32 master weights and AdamW state,
frozen bf16 reference. Two workloads, each compiled once and timed over several steps:

  dpo       DPO, frozen reference, every row 2048 real tokens (prompt 512 + response 1536)
  dpo_poet  DPO+POET, frozen reference: pairs with prompt 512 and responses of 256..1536
            tokens (fixed seed), both cut to k = min(len_c, len_r) physically (POET);
            rows padded to a multiple of 128

Attention (``--attn``): ``cudnn`` (default on GPU) is the model's native flash-attention
path, ``CausalLM(attn_implementation="cudnn")``: for right-padded rows without a KV cache
(these batches) it calls ``jax.nn.dot_product_attention(is_causal=True,
query_seq_lengths=..., implementation="cudnn")``, so cuDNN skips the masked half of the
score matrix. ``xla`` (default on CPU) is the model's default path
(``attn_implementation=None``): explicit masked attention by query blocks of 128 that skip
the key blocks above the diagonal. The micro-batch is the largest of ``--pairs`` whose
compiled step fits in 90% of device memory (XLA's memory analysis).

Prints per workload: pairs per step, step time, tokens/s (real tokens), MFU with the true
FLOP count (poet_jax.train.flops: policy forward + backward on real tokens, causal
attention, plus the reference forward) against the device's dense bf16 peak, and the peak
device memory. ``--cpu``: a tiny model on CPU (used by the tests so this script cannot rot).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
    max_position_embeddings=131072, tie_word_embeddings=True,
)
TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
)


def synthetic_batch(rng, pairs: int, prompt: int, resp_lo: int, resp_hi: int, vocab: int, poet: bool,
                    multiple: int, full_length: int | None = None):
    """A ``[1, 2b, L]`` micro-batch dict (as ``train_step`` takes) of random tokens, and the real row lengths.

    Responses have uniform random lengths in [resp_lo, resp_hi] (or ``full_length - prompt``
    when ``full_length`` is given); with ``poet`` both responses of a pair are cut to the
    shorter one's length. Rows are right-padded to a multiple of ``multiple``.
    """
    import numpy as np

    if full_length is not None:
        lc = lr = np.full(pairs, full_length - prompt)
    else:
        lc = rng.integers(resp_lo, resp_hi + 1, pairs)
        lr = rng.integers(resp_lo, resp_hi + 1, pairs)
    if poet:
        lc = lr = np.minimum(lc, lr)
    rows = np.concatenate([prompt + lc, prompt + lr])
    L = int(-(-rows.max() // multiple) * multiple)
    ids = rng.integers(3, vocab, (2 * pairs, L)).astype(np.int32)
    pos = np.arange(L)[None]
    att = (pos < rows[:, None]).astype(np.int32)
    resp = ((pos >= prompt) & (pos < rows[:, None])).astype(np.int32)
    ids = np.where(att > 0, ids, 2)
    batch = {"input_ids": ids[None], "attention_mask": att[None], "response_mask": resp[None],
             "pair_valid": np.ones((1, pairs), np.int32)}
    return batch, rows


def make_batches(rng, pairs: int, n: int, prompt: int, seq: int, vocab: int, poet: bool):
    """``n`` synthetic micro-batches padded to one common length (one compiled shape)."""
    import numpy as np

    out = [synthetic_batch(rng, pairs, prompt, seq // 8, seq - prompt, vocab, poet, min(128, seq),
                           full_length=None if poet else seq) for _ in range(n)]
    L = max(bt["input_ids"].shape[-1] for bt, _ in out)
    fixed = []
    for bt, rows in out:
        pad = L - bt["input_ids"].shape[-1]
        if pad:
            bt = {k: (np.pad(v, ((0, 0), (0, 0), (0, pad)), constant_values=2 if k == "input_ids" else 0)
                      if v.ndim == 3 else v) for k, v in bt.items()}
        fixed.append((bt, rows))
    return fixed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny model on CPU, 2 steps (smoke test)")
    p.add_argument("--workloads", default="dpo,dpo_poet")
    p.add_argument("--seq", type=int, default=None, help="row length (default 2048; cpu 128)")
    p.add_argument("--pairs", default=None, help="candidate pairs per step, largest first (default 32,16,8,4; cpu 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per workload (default 5; cpu 2)")
    p.add_argument("--attn", default=None, choices=("cudnn", "xla"),
                   help="attention: the model's cuDNN flash path or its blocked explicit path (default cudnn on "
                        "GPU, xla on CPU)")
    p.add_argument("--remat", default="dots_no_batch", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--logps-chunk", type=int, default=512, help="sequence chunk of the LM head / log-probs")
    p.add_argument("--mem-fraction", type=float, default=0.9, help="usable share of device memory for sizing")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's dense bf16 peak")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of 2 steps of the first workload")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cpu = args.cpu
    if cpu:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from poet_jax.models import transformer as T
    from poet_jax.models.config import ModelConfig
    from poet_jax.train import flops as F
    from poet_jax.train.step import StepConfig, make_state, train_step

    dev = jax.devices()[0]
    if not cpu and dev.platform != "gpu":
        raise SystemExit(f"no GPU visible to jax (default device: {dev}); use --cpu or install jax[cuda12]")
    seq = args.seq or (128 if cpu else 2048)
    steps = args.steps or (2 if cpu else 5)
    cands = [int(x) for x in (args.pairs or ("2" if cpu else "32,16,8,4")).split(",")]
    attn = args.attn or ("xla" if cpu else "cudnn")
    attn_desc = "cuDNN flash: causal + row lengths" if attn == "cudnn" else "XLA: blocked causal, explicit mask"
    dims = TINY if cpu else LLAMA_1B
    mcfg = ModelConfig(**dims, remat=args.remat, scan_layers=True)
    dtype = jnp.float32 if cpu else jnp.bfloat16
    t0 = time.perf_counter()
    model = T.CausalLM(mcfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                       attn_implementation=None if attn == "xla" else "cudnn")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    graphdef, state = make_state(model, tx)
    del model
    cast = (lambda x: x + 0) if dtype == jnp.float32 else (lambda x: x.astype(dtype))  # fp32: a real copy
    state = state.replace(ref_params=jax.jit(lambda p: jax.tree.map(cast, p))(state.params))
    init_s = time.perf_counter() - t0
    scfg = StepConfig(loss="dpo", hparams=(("beta", 0.1),), reference="frozen", logps_chunk=args.logps_chunk)
    step_fn = jax.jit(functools.partial(train_step, scfg, graphdef, tx, lambda s: jnp.asarray(1e-6)),
                      donate_argnums=(0,))
    peak = F.peak_flops_per_device(dev.device_kind, args.peak_tflops)
    if cpu and peak is None:
        import roofline

        peak = max(roofline.matmul_rate((256, 512), min_time=0.1).values())
    mem_limit = (dev.memory_stats() or {}).get("bytes_limit") if not cpu else None

    print(f"# gpu_bench: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, model {n_params / 1e6:.1f} M params "
          f"({'tiny' if cpu else 'Llama-3.2-1B shape'}), {jnp.dtype(dtype).name} compute, remat {args.remat}, "
          f"attention {attn} ({attn_desc}), logps_chunk {args.logps_chunk}, init {init_s:.1f} s, peak "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    prompt = seq // 4
    results = []
    for wl in [w for w in args.workloads.split(",") if w]:
        poet = wl == "dpo_poet"
        if wl not in ("dpo", "dpo_poet"):
            raise SystemExit(f"--workloads: unknown workload {wl!r} (dpo, dpo_poet)")
        chosen = None
        t = time.perf_counter()
        for b in cands:  # the largest micro-batch whose compiled step fits
            fixed = make_batches(rng, b, steps + 1, prompt, seq, mcfg.vocab_size, poet)
            compiled = step_fn.lower(state, fixed[0][0]).compile()
            ma = compiled.memory_analysis()
            need = None if ma is None else (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                            + ma.output_size_in_bytes - ma.alias_size_in_bytes)
            if mem_limit is None or need is None or need <= args.mem_fraction * mem_limit or b == cands[-1]:
                chosen = (b, compiled, need, fixed)
                break
            print(f"#   {wl}: {b} pairs need {need / 2**30:.1f} GiB > {args.mem_fraction:.0%} of "
                  f"{mem_limit / 2**30:.1f} GiB; trying fewer", flush=True)
        b, compiled, need, fixed = chosen
        L = fixed[0][0]["input_ids"].shape[-1]
        compile_s = time.perf_counter() - t
        state, m = compiled(state, fixed[0][0])  # warm-up
        jax.block_until_ready(m)
        if args.profile and not results:
            jax.profiler.start_trace(args.profile)
            for bt, _ in fixed[1:3]:
                state, m = compiled(state, bt)
            jax.block_until_ready(m)
            jax.profiler.stop_trace()
        t = time.perf_counter()
        for bt, _ in fixed[1:]:
            state, m = compiled(state, bt)
        loss = float(m["loss"])
        jax.block_until_ready(state.params)
        dt = (time.perf_counter() - t) / steps
        flops = np.mean([F.preference_step_flops(mcfg, rows, True) for _, rows in fixed[1:]])
        tokens = np.mean([rows.sum() for _, rows in fixed[1:]])
        stats = dev.memory_stats() or {}
        peak_mem = stats.get("peak_bytes_in_use")
        if peak_mem is None:
            import common

            peak_mem = common.peak_rss_mib() * 2**20
        mfu = F.mfu(flops, dt, 1, peak)
        rec = dict(workload=wl, pairs=b, length=L, step_s=dt, tokens_per_s=tokens / dt, pairs_per_s=b / dt,
                   tflops_per_s=flops / dt / 1e12, mfu=mfu, peak_mem_gib=peak_mem / 2**30, compile_s=compile_s,
                   loss=loss, xla_need_gib=(need or 0) / 2**30)
        results.append(rec)
        print(f"{wl:9s} pairs/step {b:3d}  L {L:5d}  step {dt:8.3f} s  tokens/s {tokens / dt:10.0f}  pairs/s "
              f"{b / dt:8.2f}  {flops / dt / 1e12:7.1f} TFLOP/s  MFU {100 * mfu if mfu else float('nan'):5.1f}%  "
              f"peak mem {peak_mem / 2**30:6.1f} GiB  compile {compile_s:5.1f} s  loss {loss:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev.device_kind, "params": int(n_params), "attn": attn,
                                               "remat": args.remat, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
