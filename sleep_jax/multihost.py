"""What a multi-process run (one JAX process per host, `jax.distributed`)
does once rather than once per process.

* One writer: results, reports, plots and metrics are written by process 0
  only (`is_writer`); every process computes the same values.
* Shared files made once: `once(name, fn)` runs `fn` on process 0 while the
  others wait at a barrier, then lets every process go on (and read what it
  made from the shared workdir).

On one process every function here is free: no barrier, always the writer.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar('T')


def is_writer() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (`name` must be the
  same string on every process, and reached in the same order)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def once(name: str, fn: Callable[[], T]) -> T | None:
  """`fn()` on process 0 (its value there, None elsewhere), the others
  waiting until it is done. A failure on process 0 stops the run: the
  others are stopped by the distributed runtime when it exits."""
  value = fn() if is_writer() else None
  barrier(f'once:{name}')
  return value
