"""Scale through the real `poet-jax train` command: an 8-device mesh (data=2 x fsdp=2 x tensor=2) and two
processes over CPU collectives give the same run as one device; parameters, optimizer state and the frozen
reference really are sharded; a killed process makes its peer exit non-zero within a bounded time.

The reference is the uninterrupted one-device run of the same config (conftest ``fault_reference_run``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from poet_jax.train.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POET_JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _weights(d: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def _assert_same_as_reference(out: Path, ref: Path, init_dir: Path) -> None:
    """Same loss curve (rel 1e-4) and the same parameter update (relative L2 error < 1e-3).

    AdamW's first steps move every weight by about lr*sign(g): float noise in a near-zero gradient entry
    can flip a sign, so the final weights are compared as one update vector, not element by element.
    """
    got, want = read_metrics(out / "metrics.jsonl", "train"), read_metrics(ref / "metrics.jsonl", "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
    for g, w in zip(got, want):
        for k in ("loss", "rewards/margins", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["step"], k)
    a, b, p0 = _weights(out / "hf"), _weights(ref / "hf"), _weights(init_dir)
    assert a.keys() == b.keys()
    da = np.concatenate([(a[k] - p0[k]).ravel() for k in sorted(a)])
    db = np.concatenate([(b[k] - p0[k]).ravel() for k in sorted(a)])
    assert np.linalg.norm(db) > 0.05  # the run did move the weights
    assert np.linalg.norm(da - db) < 1e-3 * np.linalg.norm(db)


@pytest.mark.slow
def test_8_devices_data_fsdp_tensor_equals_one_device(write_fault_config, fault_reference_run, tiny_llama_dir,
                                                      tmp_path):
    out = tmp_path / "mesh8"
    cfg = write_fault_config(out, fsdp=2, tensor=2)
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8", POET_JAX_CLUSTER="none")
    p = subprocess.run([sys.executable, "-m", "poet_jax.cli", "train", str(cfg)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_as_reference(out, fault_reference_run, tiny_llama_dir)

    rep = json.loads((out / "shardings.json").read_text())
    assert rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    specs = {k: v["spec"] for k, v in rep["params"].items()}
    q = next(v for k, v in specs.items() if "q_proj" in k)
    assert q[1:3] == ["fsdp", "tensor"]  # [layers, embed -> fsdp, heads -> tensor, head_dim]
    emb = next(v for k, v in specs.items() if k.endswith("['embed'].value"))
    assert emb == ["tensor", "fsdp"]
    # Adam's moments take their parameter's sharding
    for name, row in rep["params"].items():
        moments = [v for k, v in rep["opt_state"].items() if k.endswith(name[len("params"):]) and v["shape"] == row["shape"]]
        assert len(moments) == 2 and all(m["spec"] == row["spec"] for m in moments), name
    # nothing big is replicated: per device, params / optimizer state / reference hold < 1/3 of their bytes
    for part in ("params", "opt_state", "ref_params"):
        rows = rep[part].values()
        per_dev = sum(r["device_bytes"] for r in rows)
        total = sum(r["total_bytes"] for r in rows)
        assert per_dev < total / 3, (part, per_dev, total)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(write_fault_config, fault_reference_run, tiny_llama_dir, tmp_path):
    """launch/local.py: 2 processes x 2 CPU devices (data=2 x fsdp=2 over gloo) == 1 process, 1 device."""
    out = tmp_path / "two"
    cfg = write_fault_config(out, fsdp=2)
    p = subprocess.run([sys.executable, "launch/local.py", "-n", "2", "-d", "2", "--timeout", "400", str(cfg)],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=450)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    _assert_same_as_reference(out, fault_reference_run, tiny_llama_dir)
    rep = json.loads((out / "shardings.json").read_text())
    assert rep["processes"] == 2 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # only the primary logs and exports: one line per step, and only [0] reports the export
    assert "[0] final policy exported" in p.stdout and "[1] final policy exported" not in p.stdout


@pytest.mark.slow
def test_killed_process_stops_its_peer_within_60s(write_fault_config, tmp_path):
    out = tmp_path / "dies"
    cfg = write_fault_config(out, max_steps=400, save_every=0, export=False)
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        env = _env(POET_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", POET_JAX_NUM_PROCESSES=2, POET_JAX_PROCESS_ID=i,
                   POET_JAX_HEARTBEAT_TIMEOUT_S=10, POET_JAX_TEST_STEP_SLEEP_S=0.2)
        logs.append(open(tmp_path / f"proc{i}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, "-m", "poet_jax.cli", "train", str(cfg)], env=env, cwd=ROOT,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            recs = read_metrics(out / "metrics.jsonl", "train") if (out / "metrics.jsonl").exists() else []
            if len(recs) >= 2 or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            rc = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still running 60 s after its peer was killed")
        elapsed = time.monotonic() - t0
        assert rc != 0, (rc, elapsed)  # (wait() above already fails after 60 s)
        log = (tmp_path / "proc0.log").read_text()
        # a broken collective: one clear line, immediate exit 1; otherwise JAX's heartbeat stops it
        assert (rc == 1 and "poet-jax: error: process 0 of 2 failed" in log) or "heartbeat" in log, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()


def test_mesh_from_config_errors_name_the_keys():
    import jax

    from poet_jax.sharding import MeshError
    from poet_jax.train.config import config_from_dict
    from poet_jax.train.loop import build_mesh

    def cfg(**train):
        return config_from_dict({"model": {"path": "m", "create_tiny": True}, "data": {"path": "d"},
                                 "train": {"output_dir": "o", **train}})

    n = jax.device_count()
    assert dict(build_mesh(cfg()).shape) == {"data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(MeshError, match=rf"train.fsdp={n + 1} x train.tensor=1 .* {n} available"):
        build_mesh(cfg(fsdp=n + 1))
    with pytest.raises(MeshError, match=f"{2 * n} devices in total but {n}"):
        build_mesh(cfg(data_parallel=2 * n))


def test_row_groups_keep_each_pair_on_one_shard():
    """to_micro_batches(groups=G) and the step's row split agree: pair j's chosen and rejected rows are found
    again as pair j, and each of the G row blocks holds whole pairs."""
    import jax.numpy as jnp

    from poet_jax.data.batch import PreferenceBatch
    from poet_jax.train.loop import group_rows, to_micro_batches
    from poet_jax.train.step import _pair_to_rows, _split_rows

    B, L, A, G = 8, 3, 2, 2
    ids = np.concatenate([np.arange(B) * 10 + 1, np.arange(B) * 10 + 2])[:, None] * np.ones((1, L), np.int32)
    batch = PreferenceBatch(input_ids=ids.astype(np.int32), attention_mask=np.ones_like(ids, np.int32),
                            response_mask=np.ones_like(ids, np.int32), pair_valid=np.arange(B, dtype=np.int32) % 3)
    ref = np.stack([np.arange(B) + 0.5, np.arange(B) + 0.25], axis=1)
    mb = to_micro_batches(batch, A, ref, groups=G)
    b = B // A
    assert mb["input_ids"].shape == (A, 2 * b, L)
    for a in range(A):
        rows = mb["input_ids"][a, :, 0]
        # block g = [chosen of pairs g*b/G.., rejected of the same pairs]
        assert rows.reshape(G, 2, b // G)[:, 0].ravel().tolist() == [(a * b + j) * 10 + 1 for j in range(b)]
        c, r = _split_rows(jnp.asarray(rows), G)
        assert (np.asarray(r) - np.asarray(c)).tolist() == [1] * b  # pair j's rows pair up
        rc, rr = _split_rows(jnp.asarray(mb["ref_logps"][a]), G)
        np.testing.assert_allclose(np.asarray(rc), ref[a * b:(a + 1) * b, 0])
        np.testing.assert_allclose(np.asarray(rr), ref[a * b:(a + 1) * b, 1])
        v = np.asarray(_pair_to_rows(jnp.asarray(mb["pair_valid"][a]), G))
        vc, vr = _split_rows(jnp.asarray(v), G)
        assert np.asarray(vc).tolist() == np.asarray(vr).tolist() == mb["pair_valid"][a].tolist()
    # group_rows on a plain [2b, L] eval batch gives the same layout as one micro-batch
    np.testing.assert_array_equal(group_rows(batch.input_ids, G), to_micro_batches(batch, 1, groups=G)["input_ids"][0])
