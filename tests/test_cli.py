"""`poet-jax` command line: user errors exit with status 2 and one line naming the key; no traceback."""

from __future__ import annotations

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
