"""Data pipeline benchmark: tokenization + batching throughput and padding fractions.

Runs on the real HH-RLHF test file (2,312 pairs) with the SmolLM2-135M-Instruct
tokenizer (ChatML template). Reports

- tokenization: pairs/s and tokens/s (tokens = prompt+chosen + prompt+rejected rows),
  uncached, and the time of a cached reload;
- batching: tokens/s of building every PreferenceBatch of one epoch;
- padding fraction (padding tokens / all tokens in the batches) and the number of
  distinct batch shapes over one epoch, for: fixed max_length padding, power-of-two
  buckets, exact (pad to the longest row; unbounded shapes), each with and without
  length-grouped sampling, with and without POET.

Usage: python bench/bench_data.py [--quick] [--tokenizer HF_DIR] [--data FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from poet_jax.data import DataConfig, build_preference_data, row_lengths  # noqa: E402
from poet_jax.data.sampler import BatchSampler, batch_from_plan  # noqa: E402


def _tokenizer_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("POET_JAX_TEST_CACHE", Path.home() / ".cache" / "poet_jax" / "tests"))
    out = cache / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        from poet_jax.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

        convert_gguf_to_hf(find_smollm2_gguf(), out)
    return out


def _epoch_stats(data, batch_size: int, buckets, group: bool) -> dict:
    lengths = row_lengths(data.train_examples)
    s = BatchSampler(lengths, batch_size, bucket_lengths=buckets, seed=0, group_by_length=group)
    real = total = 0
    shapes = set()
    t0 = time.perf_counter()
    for _ in range(s.steps_per_epoch):
        b = batch_from_plan(data.train_examples, next(s), data.pad_id)
        real += int(b.attention_mask.sum())
        total += b.attention_mask.size
        shapes.add(b.input_ids.shape)
    dt = time.perf_counter() - t0
    return {
        "padding_fraction": round(1 - real / total, 4),
        "distinct_shapes": len(shapes),
        "batch_tokens_per_s": round(real / dt),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 records, for tests")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: converted SmolLM2)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir(args.tokenizer)))
    max_records = 300 if args.quick else None
    base = dict(path=args.data, on_bad_record="skip", max_length=args.max_length,
                max_prompt_length=args.max_prompt_length, max_records=max_records, show_progress=False)
    results: dict = {"quick": args.quick, "data": Path(args.data).name, "max_length": args.max_length,
                     "max_prompt_length": args.max_prompt_length, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        data = build_preference_data(DataConfig(**base), tok, cache_dir=cache)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_preference_data(DataConfig(**base), tok, cache_dir=cache)
        dt_cached = time.perf_counter() - t0
        poet = build_preference_data(DataConfig(**base, use_poet=True), tok, cache_dir=cache)
    n_tok = int(sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in data.train_examples))
    results["pairs"] = len(data.train_examples)
    results["skipped"] = dict(data.report.skipped)
    results["tokenize_pairs_per_s"] = round(len(data.train_examples) / dt, 1)
    results["tokenize_tokens_per_s"] = round(n_tok / dt)
    results["cached_reload_s"] = round(dt_cached, 3)
    results["poet_response_tokens_removed_fraction"] = round(
        poet.report.poet_tokens_removed / max(poet.report.response_tokens_before_poet, 1), 4
    )
    bs = min(args.batch_size, len(data.train_examples))
    modes = {"fixed_max_length": (args.max_length,), "pow2_buckets": data.bucket_lengths, "exact": None}
    table = {}
    for name, d in (("no_poet", data), ("poet", poet)):
        for mode, buckets in modes.items():
            for group in (False, True):
                table[f"{name}/{mode}/{'grouped' if group else 'random'}"] = _epoch_stats(d, bs, buckets, group)
    results["epoch"] = table
    results["buckets"] = list(data.bucket_lengths)
    results["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
    print(json.dumps(results, indent=1))
    print("\nsetting                               padding  shapes  batch tok/s")
    for k, v in table.items():
        print(f"{k:38s} {v['padding_fraction']:7.3f} {v['distinct_shapes']:7d} {v['batch_tokens_per_s']:12d}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
