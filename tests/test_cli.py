"""`poet-jax` command line: user errors exit with status 2 and one line naming the key; no traceback."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from poet_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "dpo.yaml")


def test_bad_key_exits_2_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "poet_jax.cli", "train", TINY, "optim.lrr=1e-6", f"train.output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("poet-jax: error:") and "optim.lrr" in lines[0] and "did you mean optim.lr" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["train", TINY, "loss.beta=0"], "loss.beta"),
        (["train", TINY, "train.global_batch=9"], "train.global_batch"),
        (["train", TINY, "data.use_poet=perhaps"], "data.use_poet"),
        (["train", TINY, "train.max_stepz=3"], "train.max_stepz"),
        (["train", TINY, "model.create_tiny=false", "model.path=/no/such/model"], "model.path"),
        (["train", "/no/such/config.yaml"], "/no/such/config.yaml"),
        (["config", TINY, "reference.mode=fixed"], "reference.mode"),
        (["export", "/no/such/run"], "/no/such/run"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, culprit, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("poet-jax: error:") and culprit in err[0]


def test_config_command_prints_resolved_config_and_schema(capsys):
    import yaml

    assert main(["config", TINY, "optim.lr=3e-4", "data.use_poet=true"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["optim"]["lr"] == 3e-4 and out["data"]["use_poet"] is True
    assert main(["config", "--schema"]) == 0
    schema = capsys.readouterr().out.splitlines()
    assert any(line.startswith("loss.beta: float = 0.1") and "#" in line for line in schema)


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_eval_and_demo_subcommands_route_to_their_parsers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0 and "--seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["eval"])  # --policy, --reference and --data are required
    assert exc.value.code == 2 and "--policy" in capsys.readouterr().err


def test_train_logs_prefix_margins_that_agree_with_the_eval_margin(tmp_path, tiny_llama_dir, shared_data):
    """`poet-jax train` adds M_k to its evaluation; the full-length M equals the trainer's own eval margin."""
    import json

    out = tmp_path / "run"
    rc = main(["train", TINY, f"model.path={tiny_llama_dir}", "model.create_tiny=false",
               f"data.path={shared_data / 'dpo_en_demo.json'}", f"train.output_dir={out}",
               "train.max_steps=2", "train.eval_pairs=8", "train.export=false", "train.progress=false",
               "train.tensorboard=false", "data.max_length=128", "data.max_prompt_length=64"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals, records
    last = evals[-1]
    assert math.isfinite(last["M_k/mean@1"]) and math.isfinite(last["M_frac/mean@0.5"])
    assert 0.0 <= last["M_k/positive@1"] <= 1.0
    # two fp32 code paths summing ~100 log-probs of size ~-400 each: ~1e-4 absolute per sum, times beta 0.1
    assert last["M_k/full_margin"] == pytest.approx(last["rewards/margins"], abs=2e-5)
    assert last["M_k/full_accuracy"] == pytest.approx(last["rewards/accuracies"], abs=1e-6)
