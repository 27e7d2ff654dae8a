"""bench/bench_packing.py --quick runs and reports consistent numbers (same pairs, four layouts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_packing_quick(tmp_path, smollm2_hf_dir):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_packing.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| POET | layout" in proc.stdout
    res = {r["layout"]: r for r in json.loads(out.read_text())["results"]}
    assert set(res) == {"plain", "shared", "packed", "packed_shared"}
    plain = res["plain"]
    for name, r in res.items():
        assert r["pairs"] == 6 and r["step_s"] > 0
        assert r["loss_diff_vs_plain"] < 1e-5, name  # every layout computes the same DPO loss
    assert abs(plain["loss"] - 0.6931) > 1e-4  # reference differs from the policy
    # plain and packed process every real token of both rows; shared layouts hold the prompt once
    assert res["packed"]["real_tokens_per_pair"] == plain["real_tokens_per_pair"]
    assert res["shared"]["real_tokens_per_pair"] == res["packed_shared"]["real_tokens_per_pair"]
    assert res["shared"]["real_tokens_per_pair"] < plain["real_tokens_per_pair"]
    # packing several pairs per row removes padding
    assert res["packed"]["padding_fraction"] < plain["padding_fraction"]
    assert res["packed_shared"]["slots_per_pair"] < plain["slots_per_pair"]
