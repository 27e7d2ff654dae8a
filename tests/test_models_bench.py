"""The model benchmarks run in --quick mode (so they cannot rot) and report sane numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_generate_quick(smollm2_hf_dir, capsys):
    prev = torch.get_num_threads()
    try:
        res = _load("bench_generate").main(["--quick", "--model", str(smollm2_hf_dir), "--torch-threads", "1"])
    finally:
        torch.set_num_threads(prev)
    assert res["prompts"] == 2 and res["new_tokens"] == 8
    assert res["jax_run_s"] > 0 and res["hf_run_s"] > 0
    assert res["token_agreement"] >= 0.75  # greedy, same weights; fp32 near-ties may flip late tokens
    assert "speed vs HF" in capsys.readouterr().out


def test_bench_load_quick(smollm2_hf_dir, capsys):
    res = _load("bench_load").main(["--quick", "--model", str(smollm2_hf_dir)])
    assert res["poet_jax"]["params"] == res["transformers"]["params"] == 134_515_008
    # streaming load: peak host memory above the baseline stays close to one copy of the weights
    assert res["poet_jax"]["peak_over_base_mb"] < 1.5 * res["checkpoint_mb"]
    assert "peak RSS" in capsys.readouterr().out
