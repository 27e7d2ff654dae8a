"""Orbax checkpoints of the training state (policy params, optimizer state, step) + loop metadata.

Layout: ``<output_dir>/checkpoints/<step>/{state,meta}``, managed by
``orbax.checkpoint.CheckpointManager`` (keep the last K). ``state`` is the pytree
``{"params", "opt_state", "step"}`` (the frozen reference is never saved: it is rebuilt
from the initial weights on resume); ``meta`` is JSON (sampler state, config, data
fingerprint) restored as a plain dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with a fixed item layout."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state_tree: Any, meta: dict, force: bool = True) -> bool:
        """Save ``state_tree`` (pytree of arrays) and ``meta`` (JSON) at ``step``; blocks until written."""
        saved = self._mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self._mngr.wait_until_finished()
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``(state_tree, meta)`` at ``step``; ``abstract_state`` gives structure, dtypes and shardings."""
        target = jax.tree.map(_abstract, abstract_state)
        out = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._mngr.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
