"""Multi-process (multi-host) start-up for poet_jax.

Call :func:`initialize_from_env` once, first thing in a process, before any JAX
computation (``poet-jax train`` does).  It decides how the process joins a job:

1. **Explicit arguments** (``coordinator_address``, ``num_processes``, ``process_id``) win.
2. **Environment variables** set by a launcher (``launch/local.py``,
   ``launch/slurm.sbatch``, ``launch/multinode.sh``):

   ======================================  =================================================
   ``POET_JAX_COORDINATOR_ADDRESS``        ``host:port`` of process 0's coordinator service
   ``POET_JAX_NUM_PROCESSES``              total number of processes (>= 1)
   ``POET_JAX_PROCESS_ID``                 this process's id, ``0 <= id < num_processes``
   ``POET_JAX_LOCAL_DEVICE_IDS``           optional, e.g. ``0`` or ``0,1``: local devices this
                                           process uses (one process per GPU)
   ``POET_JAX_CLUSTER``                    optional: ``auto`` (default), ``none`` (never join a
                                           cluster), ``slurm``, ``tpu`` or ``mpi`` (force
                                           JAX's auto-detection of that cluster)
   ``POET_JAX_INIT_TIMEOUT_S``             optional, overrides ``timeout_s``
   ``POET_JAX_HEARTBEAT_TIMEOUT_S``        optional, overrides ``heartbeat_timeout_s``
   ``POET_JAX_SHUTDOWN_TIMEOUT_S``         optional, overrides ``shutdown_timeout_s``
   ======================================  =================================================

   The three first variables go together: setting only some of them is an error.
3. **Auto-detection**: inside a multi-task SLURM step (``srun``; ``SLURM_JOB_ID``,
   ``SLURM_STEP_NODELIST``, ``SLURM_PROCID``, ``SLURM_LOCALID`` set and ``SLURM_NTASKS`` > 1),
   under Open MPI with more than one rank, or on a Cloud TPU VM (TPU worker environment
   variables or TPU chips visible under ``/dev``), ``jax.distributed.initialize()`` is called
   without arguments and JAX reads the cluster itself.
4. Otherwise the process runs alone and nothing is initialised.

Failure bounds: if one process dies, the others must not hang.  JAX's heartbeat declares
a silent peer dead after ``heartbeat_timeout_s`` (default here 30 s instead of JAX's
100 s) and then stops every process, including one blocked in a collective or waiting at
the shutdown barrier: the survivors exit non-zero about 30 s after a peer dies (tested
with two real processes, one killed).  ``shutdown_timeout_s`` (default 300 s, as in JAX)
is how long a finished process waits at exit for live but slower peers (e.g. the primary
writing the final export); keep it long, a dead peer is caught by the heartbeat anyway.

Imports jax only.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR = "POET_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "POET_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "POET_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "POET_JAX_LOCAL_DEVICE_IDS"
ENV_CLUSTER = "POET_JAX_CLUSTER"
ENV_INIT_TIMEOUT = "POET_JAX_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "POET_JAX_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT = "POET_JAX_SHUTDOWN_TIMEOUT_S"

DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_SHUTDOWN_TIMEOUT_S = 300

_CLUSTERS = ("auto", "none", "slurm", "tpu", "mpi")
# JAX's names for cluster_detection_method.
_JAX_DETECTION = {"slurm": "slurm", "mpi": "ompi", "tpu": None}


class DistributedConfigError(ValueError):
    """A distributed setting (argument or POET_JAX_* variable) is missing or invalid."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process joined (or did not join) a multi-process job.

    mode: ``"single"`` (nothing initialised), ``"explicit"`` (coordinator address, count
    and id given by arguments or POET_JAX_* variables), ``"slurm"``, ``"tpu"`` or ``"mpi"``
    (JAX auto-detection), or ``"already"`` (jax.distributed was initialised before).
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _parse_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}") from None


_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]+)$")


def validate_coordinator_address(address: str, name: str = "coordinator_address") -> str:
    """Checks ``host:port`` (IPv6 as ``[addr]:port``); returns it stripped."""
    if not isinstance(address, str) or not address.strip():
        raise DistributedConfigError(f"{name} must be 'host:port', got {address!r}")
    address = address.strip()
    m = _HOST_PORT.match(address)
    if m is None:
        raise DistributedConfigError(f"{name} must be 'host:port' (e.g. 10.0.0.1:8476), got {address!r}")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise DistributedConfigError(f"{name}: port must be in 1..65535, got {port} in {address!r}")
    return address


def _parse_device_ids(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        if not parts:
            return None
        items = [_parse_int(p, name) for p in parts]
    else:
        items = [_parse_int(v, name) for v in value]
    if any(i < 0 for i in items):
        raise DistributedConfigError(f"{name} must be non-negative device ids, got {value!r}")
    return items


def _positive_timeout(value, name: str) -> int:
    v = _parse_int(value, name)
    if v < 1:
        raise DistributedConfigError(f"{name} must be >= 1 second, got {v}")
    return v


def _tpu_env_present(env: Mapping[str, str]) -> bool:
    """True on a Cloud TPU VM / GKE TPU node (worker variables or TPU chips under /dev)."""
    if any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")):
        return True
    if env.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "cuda", "gpu", "rocm"):
        return False
    # TPU VMs expose the chips as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e and later);
    # requiring libtpu as well avoids mistaking a GPU host with VFIO pass-through for a TPU.
    chips = bool(glob.glob("/dev/accel[0-9]*")) or bool(glob.glob("/dev/vfio/[0-9]*"))
    return chips and importlib.util.find_spec("libtpu") is not None


def detect_cluster(env: Mapping[str, str] | None = None) -> str:
    """Which cluster JAX should auto-detect: ``"slurm"``, ``"tpu"``, ``"mpi"`` or ``"none"``.

    Pure in ``env`` apart from the TPU device probe under /dev.
    """
    env = os.environ if env is None else env
    forced = env.get(ENV_CLUSTER, "auto").strip().lower() or "auto"
    if forced not in _CLUSTERS:
        raise DistributedConfigError(f"{ENV_CLUSTER} must be one of {', '.join(_CLUSTERS)}, got {forced!r}")
    if forced != "auto":
        return forced
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm_vars):
        if _parse_int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
            return "slurm"
    if "OMPI_COMM_WORLD_SIZE" in env and _parse_int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    if _tpu_env_present(env):
        return "tpu"
    return "none"


def _already_initialized() -> bool:
    is_init = getattr(jax.distributed, "is_initialized", None)
    return bool(is_init()) if is_init is not None else False


def _use_gloo(env: Mapping[str, str]) -> None:
    """Collectives between CPU processes go through gloo (no effect on GPU/TPU devices)."""
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    timeout_s: int | None = None,
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedInfo:
    """Joins the multi-process job this process belongs to, if any (see the module docstring).

    Args:
      coordinator_address, num_processes, process_id: explicit settings; each wins over its
        POET_JAX_* variable.
      local_device_ids: devices of this host the process uses (default: all, or
        ``POET_JAX_LOCAL_DEVICE_IDS``).
      timeout_s: how long processes wait for each other to join (default 300 s).
      heartbeat_timeout_s: a peer silent this long is considered dead and the job is
        torn down (default 30 s); bounds how long a dead peer makes the others hang.
      shutdown_timeout_s: how long an exiting process waits for the live others at the
        shutdown barrier (default 300 s).
      env: the environment to read (default ``os.environ``); for tests.

    Returns:
      A :class:`DistributedInfo`.  Must run before any JAX computation.

    Raises:
      DistributedConfigError: a setting is missing or invalid; the message names it.
    """
    env = os.environ if env is None else env

    def pick(arg, var):
        if arg is not None:
            return arg, (
                {ENV_COORDINATOR: "coordinator_address", ENV_NUM_PROCESSES: "num_processes", ENV_PROCESS_ID: "process_id"}[var]
            )
        value = env.get(var)
        if value is not None and str(value).strip() == "":
            value = None
        return value, var

    addr, addr_name = pick(coordinator_address, ENV_COORDINATOR)
    nproc, nproc_name = pick(num_processes, ENV_NUM_PROCESSES)
    pid, pid_name = pick(process_id, ENV_PROCESS_ID)

    def timeout(arg, var, default):
        if arg is not None:
            return _positive_timeout(arg, var.replace("POET_JAX_", "").lower())
        if env.get(var, "").strip():
            return _positive_timeout(env[var], var)
        return default

    kwargs = dict(
        initialization_timeout=timeout(timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S),
        heartbeat_timeout_seconds=timeout(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=timeout(shutdown_timeout_s, ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_S),
    )
    if local_device_ids is not None:
        devices = _parse_device_ids(local_device_ids, "local_device_ids")
    else:
        devices = _parse_device_ids(env.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS)

    given = {addr_name: addr, nproc_name: nproc, pid_name: pid}
    explicit = any(v is not None for v in given.values())

    if explicit:
        n = _parse_int(nproc, nproc_name) if nproc is not None else None
        if n is not None and n < 1:
            raise DistributedConfigError(f"{nproc_name} must be >= 1, got {n}")
        if n == 1 and addr is None:
            # A single process needs no coordinator; process_id, if given, must be 0.
            if pid is not None and _parse_int(pid, pid_name) != 0:
                raise DistributedConfigError(f"{pid_name} must be 0 when {nproc_name} is 1, got {pid!r}")
            return DistributedInfo(mode="single", num_processes=1, process_id=0)
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise DistributedConfigError(
                "multi-process start needs a coordinator address, the process count and this process's id; "
                f"missing: {', '.join(missing)} (set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together)"
            )
        addr = validate_coordinator_address(str(addr), addr_name)
        p = _parse_int(pid, pid_name)
        if not 0 <= p < n:
            raise DistributedConfigError(f"{pid_name} must satisfy 0 <= id < {n} ({nproc_name}), got {p}")
        if _already_initialized():
            return DistributedInfo(mode="already", coordinator_address=addr, num_processes=n, process_id=p)
        if n == 1:
            return DistributedInfo(mode="single", num_processes=1, process_id=0)
        _use_gloo(env)
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=n,
            process_id=p,
            local_device_ids=devices,
            **kwargs,
        )
        return DistributedInfo(mode="explicit", coordinator_address=addr, num_processes=n, process_id=p)

    cluster = detect_cluster(env)
    if cluster == "none":
        return DistributedInfo(mode="single", num_processes=1, process_id=0)
    if _already_initialized():
        return DistributedInfo(mode="already")
    _use_gloo(env)
    jax.distributed.initialize(
        local_device_ids=devices,
        cluster_detection_method=_JAX_DETECTION[cluster],
        **kwargs,
    )
    return DistributedInfo(mode=cluster)


def process_index() -> int:
    """This process's index in ``0 .. process_count() - 1``."""
    return jax.process_index()


def process_count() -> int:
    """Number of JAX processes in the job (1 when running alone)."""
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0, the one that writes logs, exports and prints."""
    return jax.process_index() == 0
