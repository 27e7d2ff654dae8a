"""Fault handling for long runs: preemption (SIGTERM), non-finite guard, and test-only fault injection.

Preemption: :class:`PreemptionWatch` turns SIGTERM (the notice a TPU / cloud VM / SLURM
gives before it stops a job) into a flag the loop polls at every step boundary; the loop
then writes a checkpoint of the current step and returns normally (``poet-jax train``
exits 0). With several processes the flag is OR-ed across processes, so every process
stops at the same step and the checkpoint is written collectively.

Non-finite guard: the train step itself never applies an update whose loss or gradient
norm is NaN/Inf (the state stays as it was and the metric ``nonfinite`` is 1). With
``train.on_nonfinite=stop`` the loop then raises :class:`NonFiniteError` naming the step;
with ``skip`` it logs the step and continues. Either way no poisoned state reaches a
checkpoint.

Test-only fault injection (all off by default; read once at start-up)::

    POET_JAX_INJECT_NAN_AT_STEP=N        the loss of optimizer step N (1-based) is multiplied by NaN
    POET_JAX_INJECT_KILL_AT_STEP=N       SIGKILL this process right after step N was dispatched
    POET_JAX_INJECT_KILL_IN_SAVE_AT_STEP=N  SIGKILL this process while the checkpoint of step N is being written
    POET_JAX_TEST_STEP_SLEEP_S=S         sleep S seconds after every step (gives tests time to send signals)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

ENV_NAN = "POET_JAX_INJECT_NAN_AT_STEP"
ENV_KILL = "POET_JAX_INJECT_KILL_AT_STEP"
ENV_KILL_IN_SAVE = "POET_JAX_INJECT_KILL_IN_SAVE_AT_STEP"
ENV_SLEEP = "POET_JAX_TEST_STEP_SLEEP_S"


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/Inf (``train.on_nonfinite=stop``)."""


def _env_int(name: str, env) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive step number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive step number, got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """Test-only faults read from the environment (see the module docstring); all 0 = off."""

    nan_at_step: int = 0
    kill_at_step: int = 0
    kill_in_save_at_step: int = 0
    step_sleep_s: float = 0.0

    @classmethod
    def from_env(cls, env=None) -> "FaultInjection":
        env = os.environ if env is None else env
        sleep_raw = env.get(ENV_SLEEP, "").strip()
        try:
            sleep = float(sleep_raw) if sleep_raw else 0.0
        except ValueError:
            raise ValueError(f"{ENV_SLEEP} must be a number of seconds, got {sleep_raw!r}") from None
        return cls(_env_int(ENV_NAN, env), _env_int(ENV_KILL, env), _env_int(ENV_KILL_IN_SAVE, env), sleep)

    def after_step(self, step: int) -> None:
        """Called by the loop once optimizer step ``step`` (1-based) was dispatched."""
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if self.kill_at_step and step == self.kill_at_step:
            kill_self()

    def in_save(self, step: int) -> None:
        """Called by the checkpointer after an asynchronous save of ``step`` has started."""
        if self.kill_in_save_at_step and step == self.kill_in_save_at_step:
            kill_self()


def kill_self() -> None:
    """SIGKILL this process (no cleanup, no flush: what a crash or an OOM kill does)."""
    os.kill(os.getpid(), signal.SIGKILL)


class PreemptionWatch:
    """Installs a SIGTERM handler that sets :attr:`requested` (restored by :meth:`close`).

    Only the main thread can install signal handlers; elsewhere this is a no-op flag.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signum = signum

    def should_stop(self) -> bool:
        """True if any process got the signal (a collective when several processes run)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.asarray(flags).any())

    def close(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
