"""Exact resume after kill -9 (at random steps and in the middle of a checkpoint write), SIGTERM
(preemption: checkpoint + exit 0), and the NaN/Inf guard — through the real `poet-jax train` command.

The reference is the uninterrupted run of the same config (conftest ``fault_reference_run``); the
interrupted-and-resumed run must end with the same parameters and the same logged loss at every step.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from poet_jax.train.checkpoint import Checkpointer
from poet_jax.train.config import config_from_dict
from poet_jax.train.faults import FaultInjection
from poet_jax.train.logger import read_metrics
from poet_jax.train.loop import truncate_metrics

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POET_JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", POET_JAX_CLUSTER="none")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "poet_jax.cli", "train", str(cfg_path)]


def _run(cfg_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cfg_path), env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _complete_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _weights(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "hf" / "model.safetensors"))


def _assert_same_run(out: Path, ref: Path) -> None:
    got, want = read_metrics(out / "metrics.jsonl", "train"), read_metrics(ref / "metrics.jsonl", "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))  # each step once
    for g, w in zip(got, want):
        for k in ("loss", "grad_norm", "rewards/margins", "learning_rate"):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k)
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys()
    for k in a:  # same data order, same optimizer state: identical up to float noise
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_kill9_at_random_steps_and_during_save_then_sigterm_resume_exactly(
        write_fault_config, fault_reference_run, tmp_path):
    out = tmp_path / "run"
    cfg = write_fault_config(out)
    k1 = random.Random(int(time.time())).randint(1, 7)  # before / at / after the first save (step 4)

    # 1. SIGKILL right after step k1 (the run restarts from whatever checkpoint was complete)
    p = _run(cfg, POET_JAX_INJECT_KILL_AT_STEP=k1)
    assert p.returncode == -signal.SIGKILL, (k1, p.stderr[-2000:])
    # steps before k1 are logged; killed right after step 1, the log may not exist yet
    logged = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] if (out / "metrics.jsonl").exists() else []
    assert (logged[-1] if logged else 0) >= k1 - 1, (k1, logged)
    # 2. the same command resumes and is killed while checkpoint 8 is being written: a tmp folder is
    #    left, never picked up
    p = _run(cfg, POET_JAX_INJECT_KILL_IN_SAVE_AT_STEP=8)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    leftovers = [x.name for x in (out / "checkpoints").iterdir() if not x.name.isdigit()]
    assert any(name.startswith("8.") and "tmp" in name for name in leftovers), leftovers
    assert 8 not in _complete_steps(out) and _complete_steps(out)[-1] == 4
    ckpt = Checkpointer(out / "checkpoints")
    assert ckpt.latest_step() == 4
    ckpt.close()
    # 3. SIGTERM (preemption notice) mid-run: checkpoint at the current step, exit code 0
    launched = time.time()
    proc = subprocess.Popen(_cmd(cfg), env=_env(POET_JAX_TEST_STEP_SLEEP_S=0.4), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # records this run wrote (the killed runs logged up to step 8 too)
            steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train") if r["time"] > launched]
        except (OSError, ValueError):  # the file is being rewritten
            steps = []
        if steps and steps[-1] >= 6:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert "preempted" in stdout
    stopped = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")][-1]
    assert 6 <= stopped < 12 and _complete_steps(out)[-1] == stopped  # checkpoint of the current step
    assert not (out / "hf").exists()  # no export: the run is not finished
    # 4. the same command finishes the run: equal to the uninterrupted one
    p = _run(cfg)
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same_run(out, fault_reference_run)
    assert _complete_steps(out)[-1] == 12


@pytest.mark.slow
def test_injected_nan_stops_with_message_and_keeps_last_checkpoint(write_fault_config, tmp_path):
    from poet_jax.train.export import export_checkpoint

    out = tmp_path / "nan"
    cfg = write_fault_config(out)
    p = _run(cfg, POET_JAX_INJECT_NAN_AT_STEP=6)
    assert p.returncode == 3, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("poet-jax: error: non-finite loss or gradient at step 6") and "Traceback" not in p.stderr
    assert "newest checkpoint is step 4" in err[-1]
    assert _complete_steps(out) == [4]  # nothing written after the bad step
    recs = read_metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[-1]["nonfinite"] == 1.0
    assert not np.isfinite(recs[-1]["loss"]) and all(r["nonfinite"] == 0.0 for r in recs[:-1])
    # the last checkpoint loads and holds finite weights
    hf = export_checkpoint(out, out_dir=tmp_path / "exp")
    from safetensors.numpy import load_file

    w = load_file(str(hf / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in w.values())


def test_nonfinite_skip_drops_only_that_update(fault_train_config, fault_reference_run, tmp_path, monkeypatch):
    """on_nonfinite=skip: step 3's update is dropped, steps 1-2 equal the reference, the run finishes finite."""
    from poet_jax.train.loop import train

    monkeypatch.setenv("POET_JAX_INJECT_NAN_AT_STEP", "3")
    cfg = copy.deepcopy(fault_train_config)
    cfg["train"].update(output_dir=str(tmp_path / "skip"), on_nonfinite="skip", max_steps=5, export=False,
                        save_every=0)
    result = train(config_from_dict(cfg))
    assert result["final_step"] == 5 and result["skipped_steps"] == [3]
    got = read_metrics(tmp_path / "skip" / "metrics.jsonl", "train")
    want = read_metrics(fault_reference_run / "metrics.jsonl", "train")
    assert [r["nonfinite"] for r in got] == [0, 0, 1, 0, 0]
    for g, w in zip(got[:2], want[:2]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6)
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(got) if i != 2)
    # step 4 sees the parameters after step 2 (step 3 dropped) but step 4's batch: differs from the reference
    assert got[3]["loss"] != pytest.approx(want[3]["loss"], rel=1e-6)


def test_fault_env_parsing_and_metrics_truncation(tmp_path):
    assert FaultInjection.from_env({}) == FaultInjection()
    f = FaultInjection.from_env({"POET_JAX_INJECT_NAN_AT_STEP": "7", "POET_JAX_TEST_STEP_SLEEP_S": "0.5"})
    assert f.nan_at_step == 7 and f.step_sleep_s == 0.5 and f.kill_at_step == 0
    with pytest.raises(ValueError, match="POET_JAX_INJECT_KILL_AT_STEP"):
        FaultInjection.from_env({"POET_JAX_INJECT_KILL_AT_STEP": "soon"})
    with pytest.raises(ValueError, match="POET_JAX_INJECT_NAN_AT_STEP"):
        FaultInjection.from_env({"POET_JAX_INJECT_NAN_AT_STEP": "0"})
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 0.1 * s}) for s in range(1, 8)]
    lines.insert(4, json.dumps({"step": 4, "split": "eval", "loss": 1.0}))
    path.write_text("\n".join(lines) + '\n{"step": 8, "spl')  # torn last line of a killed writer
    assert truncate_metrics(path, 5) == 6
    recs = read_metrics(path)
    assert [(r["step"], r["split"]) for r in recs] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"),
                                                        (4, "eval"), (5, "train")]
    with pytest.raises(Exception, match="on_nonfinite"):
        config_from_dict({"model": {"path": "x", "create_tiny": True}, "data": {"path": "d"},
                          "train": {"output_dir": "o", "on_nonfinite": "ignore"}})


def test_bench_checkpoint_quick(capsys):
    """bench/bench_checkpoint.py --quick: save (blocking, total), restore timings and a bit-exact restore."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_checkpoint

    assert bench_checkpoint.main(["--quick", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["restored_equal"] is True and res["model"] == "tiny-llama"
    # policy + two AdamW moments (float32) + the step
    assert res["state_bytes"] == 3 * 4 * res["params"] + 4 + 4  # + optax's int32 count
    for k in ("async_blocking_s", "async_total_s", "sync_s", "restore_s"):
        assert res[k] > 0
    assert res["async_blocking_s"] <= res["async_total_s"]
    assert "async save, blocking part" in out and "restore" in out
