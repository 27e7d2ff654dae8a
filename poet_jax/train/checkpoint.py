"""Orbax checkpoints of the training state (policy params, optimizer state, step) + loop metadata.

Layout: ``<output_dir>/checkpoints/<step>/{state,meta}``, managed by
``orbax.checkpoint.CheckpointManager`` (keep the last K). ``state`` is the pytree
``{"params", "opt_state", "step"}`` (the frozen reference is never saved: it is rebuilt
from the initial weights on resume); ``meta`` is JSON (sampler position, RNG, config,
data fingerprint) restored as a plain dict.

Saves are collective (every process calls :meth:`Checkpointer.save`; each writes its own
shards, the primary writes the metadata) and, with ``async_save=True``, asynchronous:
``save`` returns once the arrays are copied off the devices and the files are written by
a background thread while training continues. Saves are atomic: Orbax writes into
``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` only once everything is on
disk, and :meth:`latest_step` / restore only ever see renamed (complete) steps, so a
process killed in the middle of a save leaves nothing that resume would pick up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with a fixed item layout.

    Args:
      directory: the checkpoints folder (created if needed).
      keep: keep the last ``keep`` complete checkpoints.
      async_save: write in a background thread (see the module docstring).
      on_save_started: optional hook ``f(step)`` called once a save has started (fault injection).
    """

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = False,
                 on_save_started: Callable[[int], None] | None = None):
        self.directory = Path(directory).absolute()
        self.async_save = bool(async_save)
        if jax.process_count() > 1:
            _use_distributed_barriers()
        self._hook = on_save_started
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=self.async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        #: seconds the last ``save`` call blocked the caller, and the time it was issued
        self.last_blocking_s = 0.0
        self._t_issue = 0.0

    def latest_step(self) -> int | None:
        """Newest complete checkpoint (None if there is none)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state_tree: Any, meta: dict, force: bool = True, block: bool | None = None) -> bool:
        """Save ``state_tree`` (pytree of arrays) and ``meta`` (JSON) at ``step``.

        Blocks until written unless the checkpointer is asynchronous (then only until the
        device-to-host copy is done; ``block=True`` forces a wait).
        """
        t0 = time.perf_counter()
        saved = self._mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self.last_blocking_s = time.perf_counter() - t0
        self._t_issue = t0
        if self._hook is not None:
            self._hook(int(step))
        if block or (block is None and not self.async_save):
            self.wait()
        return saved

    def wait(self) -> float:
        """Wait for a background save to finish; returns seconds since that save was issued."""
        self._mngr.wait_until_finished()
        return time.perf_counter() - self._t_issue if self._t_issue else 0.0

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``(state_tree, meta)`` at ``step``; ``abstract_state`` gives structure, dtypes and shardings."""
        target = jax.tree.map(_abstract, abstract_state)
        out = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        """Finish any background save, then release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()


def _use_distributed_barriers() -> None:
    """Make Orbax synchronise processes through the JAX distributed client instead of device collectives.

    By default Orbax's cross-process barriers are tiny all-reduces on the devices; with asynchronous
    saves some run on a background thread, concurrently with the training step's own collectives, and
    CPU collectives (gloo) then see the two interleaved differently on different processes ("collective
    mismatch"). The client barrier has no such ordering constraint (and supports timeouts).
    """
    try:
        from absl import flags

        flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    except (ImportError, KeyError):  # another Orbax version: keep its default
        return
    flag.value = True
    flag.present = 1  # readable without parsing the command line through absl


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
