#!/usr/bin/env python3
"""Run a multi-process poet_jax job on this machine (127.0.0.1) over simulated CPU devices.

The same start-up path as a pod or a cluster (``poet_jax.distributed.initialize_from_env``
reading POET_JAX_* variables), usable on a laptop and in tests.

Usage:
    python launch/local.py [options] CONFIG.yaml [key=value ...]    # runs `poet-jax train CONFIG ...`
    python launch/local.py [options] --cmd PROGRAM [ARGS ...]       # any command (--cmd comes last)

Options:
    -n, --num-processes N        processes to start (default 2)
    -d, --devices-per-process D  simulated CPU devices per process (default 1), via
                                 XLA_FLAGS=--xla_force_host_platform_device_count=D
    --port PORT                  coordinator port on 127.0.0.1 (default: a free port)
    --platform P                 JAX_PLATFORMS for the children (default cpu; '' keeps the caller's)
    --timeout S                  kill everything and fail after S seconds (default: none)
    --dry-run                    print the commands (with their POET_JAX_* environment) and exit

Every process gets POET_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, POET_JAX_NUM_PROCESSES=N,
POET_JAX_PROCESS_ID=i.  Output lines are prefixed with ``[i]``.  If any process exits
non-zero the others are killed and this script exits with that status (128+N if it
was killed by signal N); on success it exits 0.

Example:
    python launch/local.py -n 2 -d 4 configs/tiny/dpo-poet.yaml train.max_steps=20
    python launch/local.py -n 2 --cmd python -c \\
        "import poet_jax.distributed as d; d.initialize_from_env(); import jax; print(jax.process_index())"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


class UsageError(ValueError):
    """A bad command-line argument."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/local.py",
        description="Start N poet_jax processes on 127.0.0.1 over simulated CPU devices.",
        epilog="Default command: poet-jax train CONFIG [overrides...]; use --cmd PROGRAM ARGS... for any other.",
    )
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("-d", "--devices-per-process", type=int, default=1)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--platform", default="cpu")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cmd", nargs=argparse.REMAINDER, default=None, help="command to run instead of poet-jax train")
    p.add_argument("config", nargs="?", help="training YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and validates; raises UsageError with a message naming the bad option."""
    args = _parser().parse_args(argv)
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        raise UsageError(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.cmd is not None:
        if not args.cmd:
            raise UsageError("--cmd needs a program to run, e.g. --cmd python script.py")
        if args.config is not None:
            raise UsageError(f"give either CONFIG or --cmd, not both (got CONFIG {args.config!r})")
    elif args.config is None:
        raise UsageError("missing CONFIG.yaml (or --cmd PROGRAM ARGS...)")
    elif "=" in args.config:
        raise UsageError(f"the first argument must be the CONFIG file, got the override {args.config!r}")
    return args


def train_command(config: str, overrides: list[str]) -> list[str]:
    """``poet-jax train CONFIG overrides...`` (via ``python -m poet_jax.cli`` if not on PATH)."""
    exe = shutil.which("poet-jax")
    prefix = [exe] if exe else [sys.executable, "-m", "poet_jax.cli"]
    return [*prefix, "train", config, *overrides]


def xla_flags_with_devices(existing: str, devices: int) -> str:
    """``existing`` XLA_FLAGS with the host device count set to ``devices`` (replacing any)."""
    kept = [f for f in existing.split() if not f.startswith(_DEVICE_FLAG)]
    return " ".join([*kept, f"{_DEVICE_FLAG}={devices}"])


def process_envs(num_processes: int, devices: int, port: int, platform: str, base: dict[str, str]) -> list[dict[str, str]]:
    """The extra environment of each process (only the variables this launcher sets)."""
    envs = []
    for i in range(num_processes):
        e = {
            "POET_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "POET_JAX_NUM_PROCESSES": str(num_processes),
            "POET_JAX_PROCESS_ID": str(i),
            "XLA_FLAGS": xla_flags_with_devices(base.get("XLA_FLAGS", ""), devices),
            "PYTHONUNBUFFERED": "1",
        }
        if platform:
            e["JAX_PLATFORMS"] = platform
        envs.append(e)
    return envs


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
    stream.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each child leads its own session, so this is its tree only
    except (ProcessLookupError, PermissionError):
        pass


def _stop_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(p, signal.SIGKILL)
            p.wait()


def run(command: list[str], envs: list[dict[str, str]], timeout: float | None = None) -> int:
    """Starts one process per env, streams prefixed output, returns the job's exit status."""
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        for i, extra in enumerate(envs):
            p = subprocess.Popen(
                command,
                env={**os.environ, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", lock), daemon=True)
            t.start()
            pumps.append(t)
        start = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                with lock:
                    print(f"[launch] process {i} exited with status {c}; stopping the others", file=sys.stderr, flush=True)
                status = c if c > 0 else 128 - c  # killed by signal N -> 128 + N, like a shell
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                with lock:
                    print(f"[launch] timeout after {timeout:g} s; stopping all processes", file=sys.stderr, flush=True)
                status = 124
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop_all(procs)
        for t in pumps:
            t.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"launch/local.py: error: {e}", file=sys.stderr)
        return 2
    command = list(args.cmd) if args.cmd is not None else train_command(args.config, args.overrides)
    port = args.port if args.port is not None else free_port()
    envs = process_envs(args.num_processes, args.devices_per_process, port, args.platform, dict(os.environ))
    if args.dry_run:
        for e in envs:
            print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in e.items()), shlex.join(command)]))
        return 0
    return run(command, envs, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
