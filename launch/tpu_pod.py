#!/usr/bin/env python3
"""Train on a Cloud TPU VM / pod slice: create or reuse it, install, start on all workers, stream.

Usage:
    python launch/tpu_pod.py --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME \\
        [--project PROJECT] [--spot | --preemptible] [--copy DIR | --pip SPEC] \\
        [--env KEY=VALUE ...] [--watch] [--max-restarts N] [--dry-run] CONFIG.yaml [key=value ...]

What it runs (all through ``gcloud compute tpus tpu-vm``; nothing else is needed locally):
  1. ``describe NAME``: READY -> reuse; not found -> ``create``; PREEMPTED/TERMINATED -> ``delete``
     then ``create``; STOPPED -> ``start``; CREATING/STARTING/... -> wait for READY.
  2. Install on every worker (optional): ``--copy DIR`` packs the project directory (without
     .git/.venv) with ``tar``, ``scp --worker=all`` and ``pip install DIR[tpu]`` on each worker;
     ``--pip SPEC`` runs ``pip install SPEC`` (a local wheel is copied first and installed with
     the ``[tpu]`` extra; a requirement such as ``'poet-jax[tpu] @ git+https://HOST/ORG/poet_jax'``
     is installed as given).  Without either, the project must already be installed.
  3. CONFIG (a local file) is copied to ``~/poet_jax_run/`` on every worker.
  4. ``ssh --worker=all``: starts ``poet-jax train CONFIG overrides...`` on all workers at once,
     in the background with nohup, logging to ``~/poet_jax_run/train.log``; the exit status is
     written to ``~/poet_jax_run/exit_code``.  JAX detects the pod itself
     (``poet_jax.distributed.initialize_from_env``), no coordinator flags are needed.
  5. ``ssh --worker=0``: streams worker 0's (the primary's) log until the run ends; this
     script exits with worker 0's training exit status.  If ssh itself fails (status 255)
     while the TPU is still READY, it reconnects (the log is shown again from the start).

``--watch`` (alias ``--resume``): if streaming ends without success and the TPU is then
PREEMPTED (or TERMINATED / gone), delete and recreate it and rerun the same steps, up to
``--max-restarts`` times; a preemption during set-up (failing scp/ssh) is handled the
same way.  A training failure on a READY TPU is not retried.  Training resumes from the newest checkpoint in ``train.output_dir``,
so the output directory MUST be on shared, persistent storage (``gs://BUCKET/...``): a TPU
VM's disk disappears with it.

Credentials and project ids are never embedded: gcloud uses its own login; pass the project
with ``--project`` (or gcloud's default), secrets with ``--env KEY=VALUE`` or the worker's env.

``--dry-run`` prints, one per line, the commands for a TPU that does not exist yet (describe,
create, install, start, stream) and runs nothing.

Example:
    python launch/tpu_pod.py --name poet-v4 --zone us-central2-b --accelerator-type v4-32 \\
        --version tpu-ubuntu2204-base --spot --copy . --watch \\
        configs/paper/llama3-8b-instruct-dpo-poet.yaml train.output_dir=gs://my-bucket/runs/dpo_poet
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

RUN_DIR = "poet_jax_run"  # relative to the worker's home directory
LOG_FILE = f"{RUN_DIR}/train.log"
EXIT_FILE = f"{RUN_DIR}/exit_code"
REMOTE_SRC = "poet_jax_src"

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ACCEL = re.compile(r"^v[0-9]+[a-z]*-[0-9]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SSH_FAILURE = 255  # ssh's own exit status when the connection fails
MAX_RECONNECTS = 20
GONE_STATES = ("NOT_FOUND", "PREEMPTED", "TERMINATED")
WAIT_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "PROVISIONING", "REIMAGING")


class UsageError(ValueError):
    """A bad command-line argument."""


class GcloudError(RuntimeError):
    """gcloud failed in a way this script cannot handle."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
    p.add_argument("--version", required=True, help="TPU runtime, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv6e")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured project)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--spot", action="store_true", help="create a Spot TPU")
    g.add_argument("--preemptible", action="store_true", help="create a preemptible TPU")
    i = p.add_mutually_exclusive_group()
    i.add_argument("--copy", metavar="DIR", default=None, help="copy this project directory to every worker and pip install it")
    i.add_argument("--pip", metavar="SPEC", default=None, help="pip install SPEC on every worker (git URL requirement or wheel file)")
    p.add_argument("--extras", default="tpu", help="extras installed with --copy / a wheel (default: tpu)")
    p.add_argument("--python", default="python3", help="python on the workers (default python3)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the training (repeatable)")
    p.add_argument("--watch", "--resume", dest="watch", action="store_true", help="recreate and rerun after preemption")
    p.add_argument("--max-restarts", type=int, default=20)
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between state checks while waiting")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("config", help="training YAML config (a local file, copied to the workers)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for poet-jax train")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and validates; raises UsageError naming the bad flag."""
    a = _parser().parse_args(argv)
    if not _NAME.match(a.name):
        raise UsageError(f"--name {a.name!r} is not a valid TPU name (lowercase letters, digits, '-', starts with a letter)")
    if not _ZONE.match(a.zone):
        raise UsageError(f"--zone {a.zone!r} does not look like a zone (e.g. us-central2-b)")
    if not _ACCEL.match(a.accelerator_type):
        raise UsageError(f"--accelerator-type {a.accelerator_type!r} does not look like v4-32 / v5litepod-16 / v6e-8")
    if not a.version.strip() or any(c.isspace() for c in a.version):
        raise UsageError(f"--version must be a TPU runtime name, got {a.version!r}")
    if a.project is not None and not re.match(r"^[a-z][-a-z0-9:.]{4,62}$", a.project):
        raise UsageError(f"--project {a.project!r} is not a valid project id")
    if a.max_restarts < 0:
        raise UsageError(f"--max-restarts must be >= 0, got {a.max_restarts}")
    if a.poll_interval <= 0:
        raise UsageError(f"--poll-interval must be > 0, got {a.poll_interval}")
    for kv in a.env:
        key = kv.split("=", 1)[0]
        if "=" not in kv or not _ENV_KEY.match(key):
            raise UsageError(f"--env expects KEY=VALUE, got {kv!r}")
    if a.copy is not None and not os.path.isfile(os.path.join(a.copy, "pyproject.toml")):
        raise UsageError(f"--copy {a.copy!r} is not a project directory (no pyproject.toml)")
    if a.pip is not None and not a.pip.strip():
        raise UsageError("--pip needs a requirement or a wheel file")
    if not os.path.isfile(a.config):
        raise UsageError(f"CONFIG {a.config!r} does not exist (give the local YAML file; it is copied to the workers)")
    for o in a.overrides:
        if "=" not in o:
            raise UsageError(f"override {o!r} is not key=value")
    return a


class Plan:
    """Builds the exact gcloud / tar command lines for one set of arguments."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.loc = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
        self.tarball = os.path.join(tempfile.gettempdir(), f"poet_jax_src_{a.name}.tar.gz")

    def _tpu(self, verb: str, *rest: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.a.name, *self.loc, *rest]

    def describe(self) -> list[str]:
        return self._tpu("describe", "--format=value(state)")

    def create(self) -> list[str]:
        a = self.a
        extra = ["--spot"] if a.spot else ["--preemptible"] if a.preemptible else []
        return self._tpu("create", f"--accelerator-type={a.accelerator_type}", f"--version={a.version}", *extra)

    def delete(self) -> list[str]:
        return self._tpu("delete", "--quiet")

    def start_vm(self) -> list[str]:
        return self._tpu("start")

    def scp(self, local: str, remote: str) -> list[str]:
        """``remote`` is relative to the worker's home directory."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.a.name}:{remote}", *self.loc, "--worker=all"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self._tpu("ssh", f"--worker={worker}", f"--command={command}")

    def install(self) -> list[list[str]]:
        a, py = self.a, self.a.python
        extras = f"[{a.extras}]" if a.extras else ""
        if a.copy is not None:
            pack = ["tar", "-czf", self.tarball, "--exclude=.git", "--exclude=.venv", "--exclude=__pycache__",
                    "-C", os.path.abspath(a.copy), "."]
            unpack = (f"rm -rf ~/{REMOTE_SRC} && mkdir -p ~/{REMOTE_SRC} && tar -xzf ~/{REMOTE_SRC}.tar.gz -C ~/{REMOTE_SRC}"
                      f" && {py} -m pip install -q \"$HOME/{REMOTE_SRC}{extras}\"")
            return [pack, self.scp(self.tarball, f"{REMOTE_SRC}.tar.gz"), self.ssh(unpack)]
        if a.pip is not None:
            if os.path.isfile(a.pip):
                base = os.path.basename(a.pip)
                return [self.scp(a.pip, base), self.ssh(f"{py} -m pip install -q \"$HOME/{base}{extras}\"")]
            return [self.ssh(f"{py} -m pip install -q {shlex.quote(a.pip)}")]
        return []

    def remote_config(self) -> str:
        return f"{RUN_DIR}/{os.path.basename(self.a.config)}"

    def copy_config(self) -> list[list[str]]:
        return [self.ssh(f"mkdir -p ~/{RUN_DIR}"), self.scp(self.a.config, self.remote_config())]

    def train_script(self) -> str:
        """The shell line run on every worker to start training in the background."""
        exports = "".join(f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}; " for kv in self.a.env)
        train = shlex.join(["poet-jax", "train", self.remote_config(), *self.a.overrides])
        inner = f'export PATH="$HOME/.local/bin:$PATH"; {exports}{train}; echo $? > ~/{EXIT_FILE}'
        return (f"cd ~ && mkdir -p {RUN_DIR} && rm -f {EXIT_FILE} && "
                f"nohup bash -c {shlex.quote(inner)} > {LOG_FILE} 2>&1 < /dev/null &")

    def start_training(self) -> list[str]:
        return self.ssh(self.train_script())

    def stream(self) -> list[str]:
        """Follows worker 0's log until the exit code appears; exits with it."""
        script = (f"cd ~ && touch {LOG_FILE} && (tail -n +1 -F {LOG_FILE} & T=$!; "
                  f"while [ ! -s {EXIT_FILE} ]; do sleep 10; done; sleep 2; kill $T; exit $(cat {EXIT_FILE}))")
        return self.ssh(script, worker="0")


def parse_state(stdout: str) -> str:
    """``READY`` from ``READY`` or ``state: READY`` output."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.lower().startswith("state:"):
            return line.split(":", 1)[1].strip().upper()
        if line:
            return line.upper()
    return "UNKNOWN"


class Runner:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.seen_state: str | None = None  # state read by follow() after a failed stream

    def log(self, msg: str) -> None:
        print(f"[tpu_pod] {msg}", file=sys.stderr, flush=True)

    def call(self, argv: list[str], check: bool = True) -> int:
        self.log("$ " + shlex.join(argv))
        rc = subprocess.call(argv)
        if check and rc != 0:
            raise GcloudError(f"command failed with status {rc}: {shlex.join(argv)}")
        return rc

    def state(self) -> str:
        argv = self.plan.describe()
        self.log("$ " + shlex.join(argv))
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            if "NOT_FOUND" in r.stderr or "not found" in r.stderr.lower():
                return "NOT_FOUND"
            raise GcloudError(f"describe failed (status {r.returncode}): {r.stderr.strip()}")
        return parse_state(r.stdout)

    def ensure_ready(self, known_state: str | None = None) -> None:
        waited = 0.0
        while True:
            s, known_state = (known_state or self.state()), None
            self.log(f"TPU {self.plan.a.name} state: {s}")
            if s == "READY":
                return
            if s == "NOT_FOUND":
                self.call(self.plan.create())
                return
            if s in ("PREEMPTED", "TERMINATED"):
                self.call(self.plan.delete())
                self.call(self.plan.create())
                return
            if s == "STOPPED":
                self.call(self.plan.start_vm())
                return
            if s in WAIT_STATES or s == "STOPPING":
                if waited > 3600:
                    raise GcloudError(f"TPU {self.plan.a.name} stayed {s} for over an hour")
                time.sleep(self.plan.a.poll_interval)
                waited += self.plan.a.poll_interval
                continue
            raise GcloudError(f"TPU {self.plan.a.name} is in state {s}; cannot use it")

    def run_once(self, known_state: str | None = None) -> int:
        """Ready the TPU, install, start, and stream worker 0; returns the streamed status."""
        self.ensure_ready(known_state)
        for argv in self.plan.install():
            self.call(argv)
        for argv in self.plan.copy_config():
            self.call(argv)
        self.call(self.plan.start_training())
        return self.follow()

    def follow(self) -> int:
        """Streams worker 0's log; reconnects while the TPU stays READY and ssh drops (255)."""
        self.seen_state = None
        for _ in range(MAX_RECONNECTS):
            rc = self.call(self.plan.stream(), check=False)
            if rc != SSH_FAILURE:
                return rc
            self.seen_state = self.state()
            if self.seen_state != "READY":
                return rc
            self.log("lost the ssh connection to worker 0 while the TPU is READY; reconnecting")
            time.sleep(min(self.plan.a.poll_interval, 10.0))
        return rc

    def run(self) -> int:
        a = self.plan.a
        restarts, s = 0, None
        while True:
            try:
                rc = self.run_once(s)
            except GcloudError as e:
                # A preemption during set-up makes scp/ssh fail: recreate in --watch mode.
                if not a.watch:
                    raise
                self.log(str(e))
                rc, self.seen_state = 1, None
            if rc == 0:
                self.log("training finished")
                return 0
            s = self.seen_state or self.state()
            if a.watch and s in GONE_STATES and restarts < a.max_restarts:
                restarts += 1
                self.log(f"TPU is {s} (run status {rc}); recreating and resuming, restart {restarts}/{a.max_restarts}")
                continue
            self.log(f"run ended with status {rc}; TPU state {s}")
            return rc if rc > 0 else 1


def dry_run_commands(plan: Plan) -> list[list[str]]:
    """What a run on a TPU that does not exist yet executes, in order."""
    return [plan.describe(), plan.create(), *plan.install(), *plan.copy_config(), plan.start_training(), plan.stream()]


def _output_dir_warning(a: argparse.Namespace) -> str | None:
    outs = [o.split("=", 1)[1] for o in a.overrides if o.startswith("train.output_dir=")]
    if not outs:
        try:
            with open(a.config, encoding="utf-8") as f:
                m = re.search(r"^\s*output_dir:\s*['\"]?([^'\"\s#]+)", f.read(), re.M)
            outs = [m.group(1)] if m else []
        except OSError:
            outs = []
    if not outs or not outs[-1].startswith("gs://"):
        return ("warning: train.output_dir is not on gs://; checkpoints on a TPU VM's disk are lost with it, "
                "so --watch cannot resume after preemption")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(argv)
    except UsageError as e:
        print(f"launch/tpu_pod.py: error: {e}", file=sys.stderr)
        return 2
    plan = Plan(a)
    warn = _output_dir_warning(a)
    if warn and a.watch:
        print(f"launch/tpu_pod.py: {warn}", file=sys.stderr)
    if a.dry_run:
        for argv_ in dry_run_commands(plan):
            print(shlex.join(argv_))
        return 0
    try:
        return Runner(plan).run()
    except GcloudError as e:
        print(f"launch/tpu_pod.py: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"launch/tpu_pod.py: error: {e.filename or 'gcloud'} not found on PATH (install the Google Cloud SDK)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("launch/tpu_pod.py: interrupted; training keeps running on the TPU", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
