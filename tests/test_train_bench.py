"""bench/bench_train.py --quick runs and reports sane numbers (one compile per bucket length used)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from bench.bench_train import run
    finally:
        sys.path.remove(str(ROOT))
    res = run(["--quick", "--json", str(tmp_path / "r.json"), "data.bucket_lengths=[256]"])
    assert (tmp_path / "r.json").is_file()
    assert res["steps"] == 4 and res["bucket_lengths"] == [256]
    assert res["train_compiles"] == 1  # one bucket length -> exactly one compiled train step
    assert res["steady_steps"] == 3 and res["steady_steps_per_s"] > 0 and res["steady_tokens_per_s"] > 0
    assert math.isfinite(res["final_train_loss"]) and res["first_step_s"] > 0
