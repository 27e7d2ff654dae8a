"""launch/: the local launcher for real (2 processes), and the TPU / SLURM / multinode launchers
against their --dry-run output and fake gcloud / sbatch / scontrol / srun / poet-jax programs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POET_JAX_", "SLURM_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _run(argv, env=None, timeout=120, cwd=None):
    return subprocess.run([str(a) for a in argv], env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# ---------------------------------------------------------------- local.py

ALLGATHER = (
    "import poet_jax.distributed as d; info = d.initialize_from_env(); "
    "import jax, numpy as np; from jax.experimental import multihost_utils as mu; "
    "ids = mu.process_allgather(np.int32(d.process_index())).tolist(); "
    "print('RESULT', ids, jax.device_count(), jax.local_device_count(), d.is_primary(), info.mode)"
)


def test_local_launcher_runs_two_processes_that_allgather():
    r = _run([sys.executable, LAUNCH / "local.py", "-n", "2", "-d", "2", "--timeout", "120",
              "--cmd", sys.executable, "-c", ALLGATHER])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if "RESULT" in l]
    assert sorted(lines) == ["[0] RESULT [0, 1] 4 2 True explicit", "[1] RESULT [0, 1] 4 2 False explicit"], r.stdout


def test_local_launcher_failure_kills_the_others(tmp_path):
    pidfile = tmp_path / "survivor.pid"
    snippet = (
        "import os, sys, time; i = int(os.environ['POET_JAX_PROCESS_ID']); print('hello from', i, flush=True)\n"
        f"if i == 1: time.sleep(0.5); sys.exit(3)\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    t0 = time.monotonic()
    r = _run([sys.executable, LAUNCH / "local.py", "-n", "3", "--cmd", sys.executable, "-c", snippet], timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stdout + r.stderr
    assert elapsed < 30
    assert "[1] hello from 1" in r.stdout and "[0] hello from 0" in r.stdout
    assert "process 1 exited with status 3" in r.stderr
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_local_launcher_dry_run_prints_each_process_command():
    r = _run([sys.executable, LAUNCH / "local.py", "-n", "2", "-d", "4", "--port", "12345", "--dry-run",
              "--cmd", "python", "-c", "print(1)"])
    assert r.returncode == 0, r.stderr
    expected = [
        f"POET_JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 POET_JAX_NUM_PROCESSES=2 POET_JAX_PROCESS_ID={i} "
        "XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu python -c 'print(1)'"
        for i in range(2)
    ]
    assert r.stdout.splitlines() == expected
    r = _run([sys.executable, LAUNCH / "local.py", "-n", "1", "--port", "9", "--dry-run", "cfg.yaml", "a.b=1"])
    assert r.stdout.rstrip().endswith("train cfg.yaml a.b=1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0", "cfg.yaml"], "--num-processes must be >= 1"),
        (["-d", "0", "cfg.yaml"], "--devices-per-process must be >= 1"),
        (["--port", "70000", "cfg.yaml"], "--port must be in 1..65535"),
        ([], "missing CONFIG.yaml"),
        (["a=1"], "must be the CONFIG file"),
        (["cfg.yaml", "--cmd", "python"], "either CONFIG or --cmd"),
    ],
)
def test_local_launcher_bad_arguments(args, message):
    r = _run([sys.executable, LAUNCH / "local.py", *args])
    assert r.returncode == 2 and message in r.stderr, r.stderr


# ---------------------------------------------------------------- fakes

FAKE_GCLOUD = """
import json, os, sys
d = os.environ["FAKE_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(["gcloud"] + argv) + "\\n")
state_file = os.path.join(d, "state")
state = open(state_file).read().strip()
verb = argv[3]
fail_once = os.path.join(d, "preempt_on_next_worker_all_call")
if verb in ("ssh", "scp") and "--worker=all" in argv and os.path.exists(fail_once):
    os.remove(fail_once)
    open(state_file, "w").write("PREEMPTED")
    print("ssh: connect to host 10.0.0.2 port 22: Connection refused", file=sys.stderr)
    sys.exit(255)
if verb == "describe":
    if state == "NOT_FOUND":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found", file=sys.stderr)
        sys.exit(1)
    print("state: " + state)
elif verb == "create":
    open(state_file, "w").write("READY")
elif verb == "delete":
    open(state_file, "w").write("NOT_FOUND")
elif verb == "ssh" and "--worker=0" in argv:
    outcomes = json.load(open(os.path.join(d, "stream_rcs")))  # [[exit status, TPU state afterwards], ...]
    rc, state_after = outcomes.pop(0)
    json.dump(outcomes, open(os.path.join(d, "stream_rcs"), "w"))
    print("step 1 loss 0.693")
    open(state_file, "w").write(state_after)
    sys.exit(rc)
"""

FAKE_RECORDER = """
import json, os, sys
with open(os.path.join(os.environ["FAKE_DIR"], "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""

FAKE_SBATCH = FAKE_RECORDER + 'print("Submitted batch job 4242")\n'
FAKE_SCONTROL = FAKE_RECORDER + 'print("node-a\\nnode-b")\n'
FAKE_SRUN = FAKE_RECORDER + """
import subprocess
args = sys.argv[1:]
opts = {}
while args[0].startswith("--"):
    k, _, v = args.pop(0)[2:].partition("=")
    opts[k] = v
rcs = []
for i in range(int(opts["ntasks"])):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % int(opts["ntasks-per-node"])))
    rcs.append(subprocess.call(args, env=env))
sys.exit(max(rcs))
"""
FAKE_POET = """
import json, os, sys
with open(os.path.join(os.environ["FAKE_DIR"], "tasks.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("POET_JAX_")}}) + "\\n")
"""


def _install_fakes(tmp_path: Path, **programs: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in programs.items():
        p = bindir / name.replace("_", "-")
        p.write_text(f"#!{sys.executable}\n{body}")
        p.chmod(0o755)
    return _clean_env(FAKE_DIR=str(tmp_path), PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


def _calls(tmp_path: Path) -> list[list[str]]:
    f = tmp_path / "calls.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []


# ---------------------------------------------------------------- tpu_pod.py

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
LOC = ["--zone=us-central2-b", "--project=my-proj-1"]


def _tpu_args(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, str(LAUNCH / "tpu_pod.py"), "--name", "poet-v4", "--zone", "us-central2-b",
            "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base", "--project", "my-proj-1", *extra,
            str(cfg), "train.output_dir=gs://bucket/run", "optim.lr=1e-6"]


def _expected_tpu_calls(cfg: Path, pip: str | None = None):
    start = ("cd ~ && mkdir -p poet_jax_run && rm -f poet_jax_run/exit_code && nohup bash -c "
             + shlex.quote('export PATH="$HOME/.local/bin:$PATH"; export WANDB_MODE=offline; poet-jax train '
                           'poet_jax_run/cfg.yaml train.output_dir=gs://bucket/run optim.lr=1e-6; '
                           'echo $? > ~/poet_jax_run/exit_code')
             + " > poet_jax_run/train.log 2>&1 < /dev/null &")
    stream = ("cd ~ && touch poet_jax_run/train.log && (tail -n +1 -F poet_jax_run/train.log & T=$!; "
              "while [ ! -s poet_jax_run/exit_code ]; do sleep 10; done; sleep 2; kill $T; exit $(cat poet_jax_run/exit_code))")
    c = {
        "describe": [*TPU, "describe", "poet-v4", *LOC, "--format=value(state)"],
        "create": [*TPU, "create", "poet-v4", *LOC, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
        "delete": [*TPU, "delete", "poet-v4", *LOC, "--quiet"],
        "mkdir": [*TPU, "ssh", "poet-v4", *LOC, "--worker=all", "--command=mkdir -p ~/poet_jax_run"],
        "scp_cfg": [*TPU, "scp", str(cfg), "poet-v4:poet_jax_run/cfg.yaml", *LOC, "--worker=all"],
        "start": [*TPU, "ssh", "poet-v4", *LOC, "--worker=all", f"--command={start}"],
        "stream": [*TPU, "ssh", "poet-v4", *LOC, "--worker=0", f"--command={stream}"],
    }
    if pip:
        c["install"] = [*TPU, "ssh", "poet-v4", *LOC, "--worker=all", f"--command=python3 -m pip install -q {shlex.quote(pip)}"]
    return c


PIP = "poet-jax[tpu] @ git+https://example.invalid/org/poet_jax@main"


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("train:\n  output_dir: gs://bucket/run\n")
    return p


def test_tpu_dry_run_prints_the_fresh_tpu_sequence(tmp_path, cfg):
    r = _run(_tpu_args(cfg, "--spot", "--pip", PIP, "--env", "WANDB_MODE=offline", "--dry-run"))
    assert r.returncode == 0, r.stderr
    c = _expected_tpu_calls(cfg, pip=PIP)
    expected = [c["describe"], c["create"], c["install"], c["mkdir"], c["scp_cfg"], c["start"], c["stream"]]
    assert [shlex.split(l) for l in r.stdout.splitlines()] == expected


def test_tpu_dry_run_copy_packs_and_installs_the_project(tmp_path, cfg):
    r = _run(_tpu_args(cfg, "--copy", str(ROOT), "--dry-run"))
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(l) for l in r.stdout.splitlines()]
    tar = lines[2]
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(ROOT), "."] and "--exclude=.venv" in tar
    assert lines[3] == [*TPU, "scp", tar[2], "poet-v4:poet_jax_src.tar.gz", *LOC, "--worker=all"]
    assert lines[4][-1].endswith('python3 -m pip install -q "$HOME/poet_jax_src[tpu]"')
    assert "--spot" not in lines[1] and "--preemptible" not in lines[1]


def test_tpu_reuse_preempted_recreate_and_rerun(tmp_path, cfg):
    env = _install_fakes(tmp_path, gcloud=FAKE_GCLOUD)
    (tmp_path / "state").write_text("READY")
    # ssh drops while the TPU stays READY (reconnect), then the TPU is preempted, then success.
    (tmp_path / "stream_rcs").write_text('[[255, "READY"], [255, "PREEMPTED"], [0, "READY"]]')
    r = _run(_tpu_args(cfg, "--spot", "--pip", PIP, "--env", "WANDB_MODE=offline", "--watch", "--poll-interval", "0.1"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    c = _expected_tpu_calls(cfg, pip=PIP)
    run = [c["install"], c["mkdir"], c["scp_cfg"], c["start"], c["stream"]]
    assert _calls(tmp_path) == [c["describe"], *run, c["describe"], c["stream"], c["describe"], c["delete"], c["create"], *run]
    assert "reconnecting" in r.stderr
    assert "step 1 loss 0.693" in r.stdout
    assert "recreating and resuming" in r.stderr


def test_tpu_preemption_during_setup_is_recreated_in_watch_mode(tmp_path, cfg):
    env = _install_fakes(tmp_path, gcloud=FAKE_GCLOUD)
    (tmp_path / "state").write_text("READY")
    (tmp_path / "preempt_on_next_worker_all_call").write_text("")
    (tmp_path / "stream_rcs").write_text('[[0, "READY"]]')
    args = _tpu_args(cfg, "--spot", "--pip", PIP, "--env", "WANDB_MODE=offline")
    c = _expected_tpu_calls(cfg, pip=PIP)
    run = [c["install"], c["mkdir"], c["scp_cfg"], c["start"], c["stream"]]
    r = _run([*args[:2], "--watch", *args[2:]], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _calls(tmp_path) == [c["describe"], c["install"], c["describe"], c["delete"], c["create"], *run]
    # Without --watch the same failure stops the launcher with a clear message.
    (tmp_path / "calls.jsonl").unlink()
    (tmp_path / "state").write_text("READY")
    (tmp_path / "preempt_on_next_worker_all_call").write_text("")
    r = _run(args, env=env)
    assert r.returncode == 1 and "command failed with status 255" in r.stderr, r.stderr
    assert _calls(tmp_path) == [c["describe"], c["install"]]


def test_tpu_create_when_missing_and_training_failure_is_not_retried(tmp_path, cfg):
    env = _install_fakes(tmp_path, gcloud=FAKE_GCLOUD)
    (tmp_path / "state").write_text("NOT_FOUND")
    (tmp_path / "stream_rcs").write_text('[[3, "READY"]]')
    r = _run(_tpu_args(cfg, "--spot", "--env", "WANDB_MODE=offline", "--watch"), env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    c = _expected_tpu_calls(cfg)
    assert _calls(tmp_path) == [c["describe"], c["create"], c["mkdir"], c["scp_cfg"], c["start"], c["stream"], c["describe"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--spot", "--preemptible"], "not allowed with argument"),
        (["--env", "NOEQUALS"], "--env expects KEY=VALUE"),
        (["--copy", "/nonexistent-dir"], "is not a project directory"),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
    ],
)
def test_tpu_bad_arguments(tmp_path, cfg, extra, message):
    r = _run(_tpu_args(cfg, *extra, "--dry-run"))
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_tpu_bad_name_zone_and_config(tmp_path, cfg):
    args = _tpu_args(cfg, "--dry-run")
    bad_name = [a if a != "poet-v4" else "Bad_Name" for a in args]
    r = _run(bad_name)
    assert r.returncode == 2 and "--name 'Bad_Name'" in r.stderr
    r = _run([a if a != "us-central2-b" else "central" for a in args])
    assert r.returncode == 2 and "--zone 'central'" in r.stderr
    r = _run([a if a != str(cfg) else str(tmp_path / "missing.yaml") for a in args])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run([a for a in args if a != "--zone" and a != "us-central2-b"])
    assert r.returncode == 2 and "--zone" in r.stderr


# ---------------------------------------------------------------- SLURM


def test_slurm_submit_dry_run_and_real_call_agree(tmp_path, cfg):
    args = ["bash", LAUNCH / "slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--per", "gpu", "--partition", "gpu",
            "--account", "acct1", "--time", "01:00:00", "--port", "23456"]
    tail = [str(cfg), "optim.lr=1e-6", "data.name=a b"]
    expected = ["sbatch", "--nodes=2", "--ntasks-per-node=4", "--job-name=poet-jax", "--gpus-per-node=4",
                "--partition=gpu", "--account=acct1", "--time=01:00:00",
                "--export=ALL,POET_JAX_SLURM_MODE=gpu,POET_JAX_GPUS_PER_NODE=4,POET_JAX_PORT=23456",
                str(LAUNCH / "slurm.sbatch"), *tail]
    r = _run([*args, "--dry-run", *tail])
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == expected
    env = _install_fakes(tmp_path, sbatch=FAKE_SBATCH)
    r = _run([*args, *tail], env=env)
    assert r.returncode == 0 and "Submitted batch job 4242" in r.stdout, r.stderr
    assert _calls(tmp_path) == [expected]


@pytest.mark.parametrize("mode", ["node", "gpu"])
def test_slurm_job_starts_one_task_per_node_or_gpu_with_poet_env(tmp_path, cfg, mode):
    env = _install_fakes(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN, poet_jax=FAKE_POET)
    env.update(SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2",
               POET_JAX_SLURM_MODE=mode, POET_JAX_GPUS_PER_NODE="2")
    r = _run(["bash", LAUNCH / "slurm.sbatch", str(cfg), "optim.lr=1e-6"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    n, tpn = (2, 1) if mode == "node" else (4, 2)
    calls = _calls(tmp_path)
    assert calls[0] == ["scontrol", "show", "hostnames", "node-[a-b]"]
    assert calls[1][:5] == ["srun", "--nodes=2", f"--ntasks={n}", f"--ntasks-per-node={tpn}", "--kill-on-bad-exit=1"]
    tasks = [json.loads(l) for l in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [t["argv"] for t in tasks] == [["train", str(cfg), "optim.lr=1e-6"]] * n
    port = str(20000 + 1234 % 20000)
    for i, t in enumerate(tasks):
        want = {"POET_JAX_COORDINATOR_ADDRESS": f"node-a:{port}", "POET_JAX_NUM_PROCESSES": str(n),
                "POET_JAX_PROCESS_ID": str(i)}
        if mode == "gpu":
            want["POET_JAX_LOCAL_DEVICE_IDS"] = str(i % 2)
        assert {k: v for k, v in t["env"].items() if k in want or k == "POET_JAX_LOCAL_DEVICE_IDS"} == want


@pytest.mark.parametrize(
    "script, args, env, message",
    [
        ("slurm.sh", ["--nodes", "0", "CFG"], {}, "--nodes must be a positive integer"),
        ("slurm.sh", ["--per", "core", "CFG"], {}, "--per must be 'node' or 'gpu'"),
        ("slurm.sh", ["--per", "gpu", "--gpus-per-node", "0", "CFG"], {}, "--per gpu needs --gpus-per-node >= 1"),
        ("slurm.sh", ["--bogus", "CFG"], {}, "unknown option '--bogus'"),
        ("slurm.sh", ["CFG", "notkv"], {}, "override 'notkv' is not key=value"),
        ("slurm.sh", [], {}, "missing CONFIG.yaml"),
        ("slurm.sbatch", ["CFG"], {}, "SLURM_JOB_ID is not set"),
        ("slurm.sbatch", ["CFG"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1",
                                   "POET_JAX_SLURM_MODE": "gpu"}, "POET_JAX_SLURM_MODE=gpu needs POET_JAX_GPUS_PER_NODE"),
        ("multinode.sh", ["CFG"], {"NUM_NODES": "2", "NODE_RANK": "0"}, "COORDINATOR is not set"),
        ("multinode.sh", ["CFG"], {"COORDINATOR": "h", "NUM_NODES": "2", "NODE_RANK": "2"}, "NODE_RANK must be in 0..1"),
        ("multinode.sh", ["CFG"], {"COORDINATOR": "h:99999", "NUM_NODES": "2", "NODE_RANK": "0"}, "port must be in 1..65535"),
        ("multinode.sh", ["CFG"], {"COORDINATOR": "h", "NUM_NODES": "x", "NODE_RANK": "0"}, "NUM_NODES must be a positive integer"),
    ],
)
def test_shell_launchers_bad_arguments(cfg, script, args, env, message):
    r = _run(["bash", LAUNCH / script, *[str(cfg) if a == "CFG" else a for a in args]], env=_clean_env(**env))
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_multinode_dry_run_and_real_exec(tmp_path, cfg):
    env = _install_fakes(tmp_path, poet_jax=FAKE_POET)
    env.update(COORDINATOR="10.0.0.1", NUM_NODES="2", NODE_RANK="1")
    r = _run(["bash", LAUNCH / "multinode.sh", "--dry-run", str(cfg), "optim.lr=1e-6"], env=env)
    assert shlex.split(r.stdout) == ["env", "POET_JAX_COORDINATOR_ADDRESS=10.0.0.1:8476", "POET_JAX_NUM_PROCESSES=2",
                                     "POET_JAX_PROCESS_ID=1", "PYTHONUNBUFFERED=1", "poet-jax", "train", str(cfg),
                                     "optim.lr=1e-6"]
    r = _run(["bash", LAUNCH / "multinode.sh", str(cfg), "optim.lr=1e-6"], env=env)
    assert r.returncode == 0, r.stderr
    (task,) = [json.loads(l) for l in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert task == {"argv": ["train", str(cfg), "optim.lr=1e-6"],
                    "env": {"POET_JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "POET_JAX_NUM_PROCESSES": "2",
                            "POET_JAX_PROCESS_ID": "1"}}
