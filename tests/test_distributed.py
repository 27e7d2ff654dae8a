"""poet_jax.distributed: argument/env resolution (in-process, jax.distributed.initialize recorded)
and real multi-process behaviour (two processes on 127.0.0.1, one killed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import poet_jax.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(dist.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "_already_initialized", lambda: False)
    return calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- resolution (no real init)


def test_single_process_without_env_does_nothing(recorded, monkeypatch):
    monkeypatch.setattr(dist, "_tpu_env_present", lambda env: False)
    info = dist.initialize_from_env(env={})
    assert info == dist.DistributedInfo(mode="single", num_processes=1, process_id=0)
    assert recorded == []


def test_env_vars_are_passed_with_bounded_timeouts(recorded):
    env = {dist.ENV_COORDINATOR: "10.1.2.3:8476", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "3",
           dist.ENV_LOCAL_DEVICE_IDS: "0,1"}
    info = dist.initialize_from_env(env=env)
    assert info == dist.DistributedInfo("explicit", "10.1.2.3:8476", 4, 3)
    assert recorded == [dict(coordinator_address="10.1.2.3:8476", num_processes=4, process_id=3, local_device_ids=[0, 1],
                             initialization_timeout=300, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=300)]


def test_explicit_arguments_win_over_env(recorded):
    env = {dist.ENV_COORDINATOR: "10.1.2.3:8476", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "3",
           dist.ENV_HEARTBEAT_TIMEOUT: "12"}
    dist.initialize_from_env("host-a:1234", 2, 1, timeout_s=50, shutdown_timeout_s=20, env=env)
    (kw,) = recorded
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("host-a:1234", 2, 1)
    assert (kw["initialization_timeout"], kw["heartbeat_timeout_seconds"], kw["shutdown_timeout_seconds"]) == (50, 12, 20)
    assert kw["local_device_ids"] is None


@pytest.mark.parametrize(
    "env, match",
    [
        ({dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0"}, "missing: POET_JAX_COORDINATOR_ADDRESS"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2"}, "missing: POET_JAX_PROCESS_ID"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "0", dist.ENV_PROCESS_ID: "0"}, "POET_JAX_NUM_PROCESSES must be >= 1"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "two", dist.ENV_PROCESS_ID: "0"}, "POET_JAX_NUM_PROCESSES must be an integer"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "2"}, r"POET_JAX_PROCESS_ID must satisfy 0 <= id < 2"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "-1"}, "POET_JAX_PROCESS_ID must satisfy"),
        ({dist.ENV_COORDINATOR: "nohostport", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0"}, "POET_JAX_COORDINATOR_ADDRESS must be 'host:port'"),
        ({dist.ENV_COORDINATOR: "h:70000", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0"}, "port must be in 1..65535"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0", dist.ENV_HEARTBEAT_TIMEOUT: "0"}, "POET_JAX_HEARTBEAT_TIMEOUT_S must be >= 1"),
        ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0", dist.ENV_LOCAL_DEVICE_IDS: "0,x"}, "POET_JAX_LOCAL_DEVICE_IDS must be an integer"),
        ({dist.ENV_CLUSTER: "kubernetes"}, "POET_JAX_CLUSTER must be one of"),
    ],
)
def test_bad_settings_name_the_variable(recorded, env, match):
    with pytest.raises(dist.DistributedConfigError, match=match):
        dist.initialize_from_env(env=env)
    assert recorded == []


def test_bad_explicit_argument_names_the_argument(recorded):
    with pytest.raises(dist.DistributedConfigError, match=r"process_id must satisfy 0 <= id < 2 \(num_processes\)"):
        dist.initialize_from_env("h:1", 2, 5, env={})
    assert issubclass(dist.DistributedConfigError, ValueError)


def test_one_process_needs_no_coordinator(recorded):
    assert dist.initialize_from_env(env={dist.ENV_NUM_PROCESSES: "1"}).mode == "single"
    assert recorded == []


_SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
               "SLURM_LOCALID": "0"}


def test_detect_cluster(monkeypatch):
    monkeypatch.setattr(dist.glob, "glob", lambda pattern: [])
    assert dist.detect_cluster({}) == "none"
    assert dist.detect_cluster(_SLURM_STEP) == "slurm"
    # The batch step of a multi-task job, or a one-task step, is a single process.
    assert dist.detect_cluster({**_SLURM_STEP, "SLURM_NTASKS": "1"}) == "none"
    assert dist.detect_cluster({k: v for k, v in _SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}) == "none"
    assert dist.detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert dist.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert dist.detect_cluster({**_SLURM_STEP, dist.ENV_CLUSTER: "none"}) == "none"
    assert dist.detect_cluster({dist.ENV_CLUSTER: "tpu"}) == "tpu"


def test_auto_detected_cluster_calls_initialize_without_addresses(recorded, monkeypatch):
    info = dist.initialize_from_env(env=_SLURM_STEP)
    assert info.mode == "slurm"
    assert recorded == [dict(local_device_ids=None, cluster_detection_method="slurm", initialization_timeout=300,
                             heartbeat_timeout_seconds=30, shutdown_timeout_seconds=300)]
    recorded.clear()
    assert dist.initialize_from_env(env={"TPU_WORKER_HOSTNAMES": "a,b", dist.ENV_HEARTBEAT_TIMEOUT: "20"}).mode == "tpu"
    assert recorded[0]["cluster_detection_method"] is None and recorded[0]["heartbeat_timeout_seconds"] == 20


def test_helpers_single_process():
    assert dist.process_index() == 0 and dist.process_count() == 1 and dist.is_primary()


# ---------------------------------------------------------------- real processes

_WORKER = textwrap.dedent(
    """
    import sys, time
    import poet_jax.distributed as d
    info = d.initialize_from_env()
    import jax, numpy as np
    from jax.experimental import multihost_utils
    ids = multihost_utils.process_allgather(np.int32(d.process_index()))
    print("ids", ids.tolist(), "count", d.process_count(), "primary", d.is_primary(), "mode", info.mode, flush=True)
    if d.process_index() == 1:
        print("victim ready", flush=True)
        time.sleep(600)
    print("entering collective", flush=True)
    multihost_utils.process_allgather(np.int32(d.process_index()))  # blocks: process 1 never joins
    print("collective returned", flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_allgather_then_dead_peer_stops_the_other_within_60s(tmp_path):
    port = _free_port()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POET_JAX_", "SLURM_", "XLA_FLAGS"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                POET_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", POET_JAX_NUM_PROCESSES="2")
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, str(script)], env={**base, "POET_JAX_PROCESS_ID": str(i)},
                         stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 90
        while not (logs[0].read_text().count("entering collective") and "victim ready" in logs[1].read_text()):
            assert time.monotonic() < deadline, (logs[0].read_text(), logs[1].read_text())
            assert procs[0].poll() is None and procs[1].poll() is None, (logs[0].read_text(), logs[1].read_text())
            time.sleep(0.2)
        time.sleep(1.0)  # let process 0 block inside the collective
        assert procs[0].poll() is None
        procs[1].kill()
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out0, out1 = logs[0].read_text(), logs[1].read_text()
    assert "ids [0, 1] count 2 primary True mode explicit" in out0
    assert "ids [0, 1] count 2 primary False mode explicit" in out1
    assert "collective returned" not in out0
    assert rc != 0
    assert elapsed < 60, f"survivor took {elapsed:.1f} s to exit"
