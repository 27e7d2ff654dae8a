"""``poet-jax eval`` (main_eval): M_k of several policies side by side, generations, user errors."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from poet_jax.demo.task import TaskConfig, make_task_data, words, write_jsonl
    from poet_jax.demo.tokenizer import build_tokenizer, save_tokenizer
    from poet_jax.train.config import TinyModelSpec
    from poet_jax.train.tiny import create_tiny_model_dir

    root = tmp_path_factory.mktemp("evalcli")
    task = TaskConfig(max_operand=2, long_tail=(3, 5))
    tok_dir = save_tokenizer(build_tokenizer(words(task)), root / "tok")
    out = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             seed=seed, tokenizer=str(tok_dir), init_std=0.2)
        out[name] = create_tiny_model_dir(root / name, spec)
    data = make_task_data(task, seed=0, n_sft=1, n_train_pairs=1, n_eval_pairs=6)
    out["data"] = write_jsonl(data.eval_pairs, root / "pairs.jsonl")
    out["root"] = root
    return out


def test_eval_cli_writes_reports(dirs, capsys):
    from poet_jax.evaluate.cli import main_eval

    out = dirs["root"] / "out"
    argv = ["--reference", str(dirs["reference"]), "--policy", f"P={dirs['policy']}",
            "--policy", f"REF={dirs['reference']}", "--data", str(dirs["data"]), "--beta", "0.5",
            "--generate", "2", "--reward", "poet_jax.demo.task:answer_reward", "--max-new-tokens", "4", "--out", str(out)]
    assert main_eval(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("P: margin") and "\nREF: margin 0.0000" in printed
    res = json.loads((out / "prefix_margins.json").read_text())
    assert set(res) == {"P", "REF"}
    p, ref = res["P"]["prefix_margins"], res["REF"]["prefix_margins"]
    assert p["n_pairs"] == 6 and p["beta"] == 0.5
    assert p["mean_M_k"][-1] == pytest.approx(p["margin"], rel=1e-6, abs=1e-7)
    assert p["margin"] != 0.0
    assert all(v == 0.0 for v in ref["mean_M_k"]) and ref["accuracy"] == 0.0
    assert res["REF"]["generation"]["win_rate"] == 0.5  # the reference against its own samples
    assert res["P"]["generation"]["n_prompts"] == 2  # distinct held-out prompts
    gens = json.loads((out / "generations_P.json").read_text())
    assert len(gens["records"]) == 2 and all(r["reward"] in (0.0, 1.0) for r in gens["records"])
    assert (out / "prefix_margins.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "/nonexistent"], "not a Hugging Face model directory"),
        (["--generate", "2"], "--generate needs --reward"),
        (["--generate", "2", "--reward", "nomodule"], "expected 'lm:DIR'"),
    ],
)
def test_eval_cli_user_errors(dirs, capsys, extra, message):
    from poet_jax.evaluate.cli import main_eval

    argv = ["--reference", str(dirs["reference"]), "--data", str(dirs["data"]), "--out", str(dirs["root"] / "e")]
    if extra[0] != "--policy":
        argv += ["--policy", str(dirs["policy"])]
    assert main_eval(argv + extra) == 2
    assert message in capsys.readouterr().err
