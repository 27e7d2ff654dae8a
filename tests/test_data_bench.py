"""bench/bench_data.py --quick runs and its numbers are consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_quick(smollm2_hf_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_data.py"), "--quick", "--tokenizer", str(smollm2_hf_dir),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["pairs"] + sum(r["skipped"].values()) == 300
    assert r["tokenize_tokens_per_s"] > 0 and r["tokenize_pairs_per_s"] > 0
    assert 0 < r["poet_response_tokens_removed_fraction"] < 1
    ep = r["epoch"]
    for poet in ("no_poet", "poet"):
        fixed = ep[f"{poet}/fixed_max_length/random"]
        assert fixed["distinct_shapes"] == 1
        for group in ("random", "grouped"):
            b = ep[f"{poet}/pow2_buckets/{group}"]
            assert b["distinct_shapes"] <= len(r["buckets"])
            assert ep[f"{poet}/exact/{group}"]["padding_fraction"] <= b["padding_fraction"] <= fixed["padding_fraction"]
        assert ep[f"{poet}/pow2_buckets/grouped"]["padding_fraction"] < ep[f"{poet}/pow2_buckets/random"]["padding_fraction"]
