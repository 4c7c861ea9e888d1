"""One small wrapper around orbax's CheckpointManager: save every N steps, restore into a target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves a train-state pytree every `every` steps under `directory`, keeping the last `keep`.

  `restore_latest(target)` restores into the structure, shapes, dtypes and shardings of `target`
  (concrete arrays or `jax.ShapeDtypeStruct`s), or returns None when nothing was saved yet.
  """

  def __init__(self, directory: str | Path, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint interval every={every} must be >= 1")
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True
      ),
    )

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` as `step` when the interval says so (or `force`); True if it saved."""
    if force and step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, target: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint restored into `target`'s structure, or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    """Waits for pending asynchronous saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
