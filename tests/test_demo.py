"""The embedded demo: the synthetic task, its tokenizer, and the quick end-to-end run."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest


def test_task_shape_and_reward():
    from poet_jax.demo.task import (
        LONG_FILLER, SHORT_FILLER, TaskConfig, answer_reward, make_pair, make_task_data, parse_prompt,
    )

    cfg = TaskConfig(max_operand=4, short_tail=(0, 1), long_tail=(6, 9), p_long=1.0)
    data = make_task_data(cfg, seed=1, n_sft=50, n_train_pairs=40, n_eval_pairs=10, heldout_fraction=0.25)
    for rec in data.train_pairs + data.eval_pairs:
        q = rec["prompt"][0]["content"]
        a, b = parse_prompt(q)
        c, r = rec["chosen"][0]["content"], rec["rejected"][0]["content"]
        assert answer_reward(q, c) == 1.0 and answer_reward(q, r) == 0.0
        assert 1 <= abs(int(r.split()[0]) - (a + b)) <= cfg.wrong_offset_max
        assert 2 <= len(c.split()) <= 3 and 11 <= len(r.split()) <= 14  # answer, ".", lead of 3, tail
        assert set(c.split()[2:]) <= set(SHORT_FILLER) and set(r.split()[2:5]) <= set(SHORT_FILLER)
        assert set(r.split()[5:]) <= set(LONG_FILLER)
    # held-out questions never appear in the preference training pairs
    train_q = {r["prompt"][0]["content"] for r in data.train_pairs}
    assert not train_q & set(data.eval_prompts)
    assert {r["prompt"][0]["content"] for r in data.eval_pairs} <= set(data.eval_prompts)
    # same seed, same data
    again = make_task_data(cfg, seed=1, n_sft=50, n_train_pairs=40, n_eval_pairs=10, heldout_fraction=0.25)
    assert again.train_pairs == data.train_pairs and again.sft == data.sft
    # default: held-out pairs are fresh pairs on the same questions, every question is a prompt
    same_q = make_task_data(cfg, seed=1, n_sft=5, n_train_pairs=40, n_eval_pairs=10)
    assert len(same_q.eval_prompts) == 25 and same_q.eval_pairs != same_q.train_pairs[:10]

    # the long tail moves to the chosen side / labels flip
    rng = random.Random(0)
    rec = make_pair(rng, 1, 2, TaskConfig(longer_side="chosen", p_long=1.0, long_tail=(5, 5)))
    assert len(rec["chosen"][0]["content"].split()) == 2 + 3 + 5
    rec = make_pair(rng, 1, 2, TaskConfig(label_noise=1.0))
    assert answer_reward("what is 1 + 2 ?", rec["chosen"][0]["content"]) == 0.0

    assert answer_reward("what is 1 + 2 ?", "  3 . ok") == 1.0
    assert answer_reward("what is 1 + 2 ?", "") == 0.0
    with pytest.raises(ValueError, match="not a demo prompt"):
        answer_reward("what is 1 plus 2 ?", "3")
    with pytest.raises(ValueError, match="longer_side"):
        TaskConfig(longer_side="both")
    with pytest.raises(ValueError, match="long_tail"):
        TaskConfig(long_tail=(5, 2))


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from poet_jax.demo.task import TaskConfig, words
    from poet_jax.demo.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer(words(TaskConfig()))
    save_tokenizer(tok, tmp_path / "tok")
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (1, 2, 2)
    msgs = [{"role": "user", "content": "what is 3 + 4 ?"}]
    full = msgs + [{"role": "assistant", "content": "7 . ok"}]
    text = tok2.apply_chat_template(full, tokenize=False)
    assert text == "<|im_start|>user what is 3 + 4 ?<|im_end|><|im_start|>assistant 7 . ok<|im_end|>"
    p = tok2(tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    f = tok2(text, add_special_tokens=False)["input_ids"]
    assert f[: len(p["input_ids"])] == p["input_ids"]  # the prompt is a token prefix
    resp = f[len(p["input_ids"]):]
    assert tok2.convert_ids_to_tokens(resp) == ["7", ".", "ok", "<|im_end|>"]
    assert tok2.decode(resp, skip_special_tokens=True) == "7 . ok"
    assert tok2.convert_tokens_to_ids("zebra") is not None and tok2("zebra")["input_ids"] == [3]  # <unk>
    with pytest.raises(ValueError, match="whitespace"):
        build_tokenizer(["two words"])


def test_quick_demo_end_to_end(tmp_path):
    # a subprocess: the demo turns on JAX's persistent compilation cache (process-wide)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "poet_jax.demo.run", "--quick", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "| DPO+POET |" in printed and "answer acc." in printed
    assert (out / "prefix_margins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| DPO |" in table and "| SFT (start) |" in table
    res = json.loads((out / "results.json").read_text())
    seed = res["per_seed"][0]
    assert 0.0 <= seed["sft"]["answer_accuracy"] <= 1.0
    for v in ("DPO", "DPO+POET"):
        r = seed[v]
        assert 0.0 <= r["reward_accuracy"] <= 1.0 and 0.0 <= r["answer_accuracy"] <= 1.0
        assert 0.0 <= r["win_rate"] <= 1.0 and r["response_length"] > 0
        assert np.isfinite(r["M_1"]) and np.isfinite(r["dpo_margin"])
        assert r["dpo_margin"] > 0  # a few DPO steps already separate the held-out pairs
        mk = r["M_k"]
        assert mk["mean_M_k"][-1] == pytest.approx(mk["margin"], rel=1e-5, abs=1e-6)
    # the exported policies and the SFT start are ordinary HF directories
    assert (out / "seed0" / "sft" / "config.json").is_file()
    assert (out / "seed0" / "DPO_POET" / "hf" / "model.safetensors").is_file()
