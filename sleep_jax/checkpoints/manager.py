"""Orbax checkpoints of {train state, grain iterator state, metadata}.

One `CheckpointManager` per run directory (`<workdir>/checkpoints`). Each
step holds three items:

* `state`: the train state pytree, restored straight into its shardings;
* `data`: the grain iterator state (per process), so resuming replays
  exactly the batches an uninterrupted run would see;
* `metadata`: JSON (config, step, code version, anything the caller adds)
  and a checksum of every array of `state` (sleep_jax.checkpoints.integrity),
  compared on restore: damaged bytes raise CorruptCheckpointError instead
  of restoring wrong numbers.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Mapping

from absl import logging
import grain
import orbax.checkpoint as ocp

from sleep_jax import multihost
from sleep_jax.checkpoints import integrity


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with our three items."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=('state', 'data', 'metadata'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None,
           metadata: Mapping[str, Any] | None = None, *, force: bool = False
           ) -> bool:
    metadata = dict(metadata or {}, step=step)
    metadata['checksums'] = integrity.checksums(state)
    items = {'state': ocp.args.StandardSave(state),
             'metadata': ocp.args.JsonSave(metadata)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               force=force)
    if saved:
      logging.info('Saving checkpoint step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores step `step`.

    Args:
      step: which step.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding`
        (e.g. from `jax.eval_shape` + shardings): arrays are placed directly
        into those shardings.
      data_iterator: a fresh grain iterator of the same pipeline; its state
        is set in place.

    Returns:
      (state, metadata dict).

    Raises:
      CorruptCheckpointError: the arrays do not match their checksums.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state),
             'metadata': ocp.args.JsonRestore()}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    metadata = dict(restored['metadata'])
    integrity.verify(restored['state'], metadata.pop('checksums', None),
                     os.path.join(self.directory, str(step)))
    return restored['state'], metadata

  def restore_newest(self, abstract_state, data_iterator=None, *,
                     check: Callable[[int, Any, dict], None] | None = None,
                     log: Callable[[str], None] = print):
    """(step, state, metadata) of the newest step that restores whole and
    passes `check(step, state, metadata)` (which raises if not), or None.

    A step that fails either way is reported (path, what failed), moved
    aside to `<directory>.bad-step<step>-<time>` so it is never tried again
    and nothing is deleted, and the step before it is tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, metadata = self.restore(step, abstract_state, data_iterator)
        if check is not None:
          check(step, state, metadata)
      except Exception as e:  # pylint: disable=broad-except
        bad = os.path.join(self.directory, str(step))
        aside = f'{self.directory}.bad-step{step}-{int(time.time())}'
        log(f'checkpoint {bad} is unreadable or not this run\'s '
            f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); moved '
            f'to {aside}, falling back to the step before it.')
        # One process moves it (a shared directory), the others wait.
        multihost.once(f'set-aside:{bad}', lambda: shutil.move(bad, aside))
        self.reload()
        continue
      return step, state, metadata
    return None

  def reload(self) -> None:
    """Re-reads the steps on disk (after one was moved aside)."""
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

