"""End-to-end: a tiny run on real pairs (loss falls, reward accuracy rises), resume, logs, HF export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from poet_jax.train.config import config_from_dict
from poet_jax.train.logger import read_metrics
from poet_jax.train.loop import train


@pytest.mark.slow
def test_tiny_run_learns_resumes_and_exports(tiny_llama_dir, shared_data, tmp_path):
    from poet_jax.cli import main as cli_main

    data = shared_data / "dpo_en_demo.json"
    out = tmp_path / "run"
    base = {
        "model": {"path": str(tiny_llama_dir)},
        # 16 real pairs, evaluated on the same (training) pairs
        "data": {"path": str(data), "eval_path": str(data), "max_records": 16, "max_length": 128,
                 "max_prompt_length": 64, "bucket_lengths": [128], "use_poet": True},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 2e-3, "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"output_dir": str(out), "global_batch": 8, "micro_batch": 4, "max_steps": 16,
                  "log_every": 4, "save_every": 8, "eval_every": 0, "progress": False, "keep_checkpoints": 2},
    }
    first = train(config_from_dict(base))
    assert first["final_step"] == 16
    # rerun with the same output_dir and more steps: resumes at 16 (policy, Adam state, step, sampler)
    base["train"]["max_steps"] = 32
    result = train(config_from_dict(base))
    assert result["final_step"] == 32

    recs = read_metrics(out / "metrics.jsonl", "train")
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, 33))  # every step logged exactly once across the two invocations
    assert recs[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    first_acc = np.mean([r["rewards/accuracies"] for r in recs[:2]])
    last = recs[-4:]
    assert np.mean([r["loss"] for r in last]) < 0.5
    assert np.mean([r["rewards/accuracies"] for r in last]) > max(first_acc, 0.9)
    for key in ("learning_rate", "grad_norm", "poet/k", "logits/chosen", "logps/rejected", "rewards/margins"):
        assert key in recs[-1]
    for key in ("tokens_per_second", "pairs_per_second", "poet/kept_fraction"):
        assert recs[-1][key] > 0
    assert 0 < recs[-1]["poet/kept_fraction"] < 1  # POET cut some response tokens
    ev = read_metrics(out / "metrics.jsonl", "eval")
    assert [r["step"] for r in ev] == [16, 32]
    assert ev[-1]["rewards/accuracies"] > ev[0]["rewards/accuracies"] or ev[-1]["rewards/accuracies"] == 1.0
    assert ev[-1]["loss"] < ev[0]["loss"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [24, 32]  # keep_checkpoints=2

    # the HF export reloads in transformers and gives our model's logits
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poet_jax.models import from_pretrained

    hf_dir = out / "hf"
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = np.asarray([tok("Hello there, how do I bake bread?")["input_ids"]], np.int32)
    ours = np.asarray(from_pretrained(hf_dir, dtype=jnp.float32)(jnp.asarray(ids)))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    init = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        assert not np.allclose(init(torch.tensor(ids, dtype=torch.long)).logits.numpy(), theirs, atol=1e-3)

    # `poet-jax export` of the last checkpoint writes the same weights
    from safetensors.numpy import load_file

    assert cli_main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    a, b = load_file(str(tmp_path / "exp" / "model.safetensors")), load_file(str(hf_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["model_type"] == "llama"

    # resumed == uninterrupted: a fresh run of 24 steps equals checkpoint 24 of the run resumed at 16
    base["train"].update(max_steps=24, output_dir=str(tmp_path / "straight"), save_every=0)
    straight = train(config_from_dict(base))
    assert straight["final_step"] == 24
    assert cli_main(["export", str(out), "--step", "24", "--out", str(tmp_path / "exp24")]) == 0
    a = load_file(str(tmp_path / "exp24" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    resumed = {r["step"]: r["loss"] for r in recs}
    for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", "train"):
        assert r["loss"] == pytest.approx(resumed[r["step"]], abs=1e-6), r["step"]
