"""Load time and peak host memory of ``poet_jax.models.from_pretrained`` vs transformers.

Each measurement runs in a fresh subprocess: it imports the libraries, records the
resident set size (baseline), loads SmolLM2-135M-Instruct (fp32 HF directory), waits for
every parameter to be materialised, and reports the wall time and the RSS high-water mark
(``VmHWM`` from /proc/self/status) above the baseline.

    .venv/bin/python bench/bench_load.py            # 3 runs each
    .venv/bin/python bench/bench_load.py --quick    # 1 run each
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _worker(impl: str, path: str) -> None:
    if impl == "poet_jax":
        import jax

        from poet_jax.models import from_pretrained

        jax.block_until_ready(jax.numpy.zeros(1))
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        model = from_pretrained(path)
        from flax import nnx

        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.zeros(1)
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dt = time.perf_counter() - t0
    hwm_load = _status_kb("VmHWM")
    # touch every weight (transformers may keep them memory-mapped from the file until used)
    if impl == "poet_jax":
        import jax

        [float(jax.numpy.sum(x)) for x in jax.tree.leaves(nnx.state(model))]
    else:
        with torch.no_grad():
            [float(p.sum()) for p in model.parameters()]
    n_params = sum(int(x.size) for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(model))) \
        if impl == "poet_jax" else sum(p.numel() for p in model.parameters())
    print("RESULT" + json.dumps(dict(impl=impl, seconds=dt, base_mb=base / 1024, hwm_mb=hwm_load / 1024,
                                     touched_mb=_status_kb("VmHWM") / 1024,
                                     params=n_params)))


def _run(impl: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", impl, "--model", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run per implementation")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--model", type=Path, default=None, help="HF directory (default: SmolLM2 from the GGUF)")
    ap.add_argument("--worker", choices=["poet_jax", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, str(args.model))
        return {}
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common

        args.model = common.smollm2_dir()
    reps = args.repeats or (1 if args.quick else 3)
    ckpt_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 2**20
    results = {}
    for impl in ("poet_jax", "transformers"):
        runs = [_run(impl, args.model) for _ in range(reps)]
        results[impl] = dict(
            seconds=statistics.median(r["seconds"] for r in runs),
            base_mb=statistics.median(r["base_mb"] for r in runs),
            hwm_mb=statistics.median(r["hwm_mb"] for r in runs),
            touched_mb=statistics.median(r["touched_mb"] for r in runs),
            params=runs[0]["params"],
        )
        results[impl]["peak_over_base_mb"] = results[impl]["hwm_mb"] - results[impl]["base_mb"]
    print(f"from_pretrained of {args.model.name} ({ckpt_mb:.0f} MiB of safetensors, fp32), median of {reps} "
          f"fresh process(es)")
    print(f"| {'impl':<13} | {'load s':>7} | {'RSS before MiB':>14} | {'peak RSS MiB':>12} | {'peak - before':>13} "
          f"| {'peak after touching weights':>27} |")
    print(f"|{'-' * 15}|{'-' * 9}|{'-' * 16}|{'-' * 14}|{'-' * 15}|{'-' * 29}|")
    for impl, r in results.items():
        print(f"| {impl:<13} | {r['seconds']:>7.2f} | {r['base_mb']:>14.0f} | {r['hwm_mb']:>12.0f} | "
              f"{r['peak_over_base_mb']:>13.0f} | {r['touched_mb']:>27.0f} |")
    ratio = results["poet_jax"]["seconds"] / results["transformers"]["seconds"]
    print(f"poet_jax / transformers load time: {ratio:.2f}; params {results['poet_jax']['params']:,} vs "
          f"{results['transformers']['params']:,} (transformers counts the tied head once)")
    results["checkpoint_mb"] = ckpt_mb
    return results


if __name__ == "__main__":
    main()
