"""Blocked causal attention vs the full-mask attention, in the whole model, on this CPU.

    .venv/bin/python bench/bench_attention.py            # SmolLM2-135M shapes, 8 rows x 512, 2 threads
    .venv/bin/python bench/bench_attention.py --quick    # 2 layers, 4 rows x 256 (tests)

Builds a decoder with SmolLM2-135M's shape (random weights: the speed does not depend on
them; ``--layers`` to shorten it) and times, in the same run, the trunk forward and the
trunk forward + backward (gradient of the summed final hidden states w.r.t. all
parameters, remat ``dots_no_batch`` as the benchmarks train) for two attention paths:

* ``blocked`` — the default (``attn_implementation=None``): explicit masked attention by
  query blocks of ``ATTN_BLOCK`` slots that skip the key blocks above the diagonal;
* ``full`` — ``attn_implementation="xla"``: ``jax.nn.dot_product_attention`` with the
  full ``[B, T, T]`` mask (the path before the change).

Both compile once; each is then timed ``--repeats`` times alternately (median shown). The
outputs are compared (max relative difference of the hidden states). Prints the table and
the ratio full / blocked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 4 rows of 256, 2 repeats")
    p.add_argument("--rows", type=int, default=None, help="rows per batch (default 8; quick 4)")
    p.add_argument("--length", type=int, default=None, help="slots per row (default 512; quick 256)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30 = SmolLM2; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    q = args.quick
    rows, length = args.rows or (4 if q else 8), args.length or (256 if q else 512)
    layers, repeats = args.layers or (2 if q else 30), args.repeats or (2 if q else 3)
    common.pin_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from poet_jax.models import CausalLM, ModelConfig
    from poet_jax.models.transformer import ATTN_BLOCK

    cfg = ModelConfig(**{**SMOLLM2, "num_layers": layers}, remat="dots_no_batch", scan_layers=True)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, length)), jnp.int32)
    lengths = rng.integers(length // 2, length + 1, rows)
    lengths[0] = length
    mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)  # right padding, like the trainer

    def build(impl):
        model = CausalLM(cfg, rngs=nnx.Rngs(0), attn_implementation=impl)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def fwd(p):
            return nnx.merge(graphdef, p, rest).hidden_states(ids, mask)

        def fwd_bwd(p):
            return jax.grad(lambda p: jnp.sum(fwd(p) * mask[..., None]))(p)

        return params, jax.jit(fwd).lower(params).compile(), jax.jit(fwd_bwd).lower(params).compile()

    paths = {"blocked": build(None), "full": build("xla")}
    outs = {k: np.asarray(v[1](v[0])) for k, v in paths.items()}
    real = np.asarray(mask, bool)
    diff = float(np.max(np.abs(outs["blocked"] - outs["full"])[real]) / np.max(np.abs(outs["full"][real])))
    times = {(k, w): [] for k in paths for w in ("fwd", "fwd+bwd")}
    for _ in range(repeats):
        for k, (params, fwd, fwd_bwd) in paths.items():
            for w, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                t = time.perf_counter()
                jax.block_until_ready(fn(params))
                times[(k, w)].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    info = common.machine_info()
    print(f"# bench_attention: SmolLM2-135M shape, {layers} layers, {rows} rows x {length} slots (right-padded, "
          f"{int(real.sum())} real tokens), fp32, remat dots_no_batch, {args.threads} threads, block {ATTN_BLOCK}, "
          f"median of {repeats}")
    print(f"# {info['date']}, {info['cpu']} ({info['cores']} cores), load average {info['load_avg']}")
    table = [[w, "%.3f" % med[("full", w)], "%.3f" % med[("blocked", w)], "%.2fx" % (med[("full", w)] / med[("blocked", w)])]
             for w in ("fwd", "fwd+bwd")]
    print(common.fmt_table(["pass", "full mask s", "blocked s", "full / blocked"], table, "lrrr"))
    print(f"# max relative difference of the hidden states (real tokens): {diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "median_s": {
            f"{k}/{w}": v for (k, w), v in med.items()}, "max_rel_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
