"""What a multi-process run (one JAX process per host, `jax.distributed`)
does once rather than once per process.

* One writer: results, reports, plots and metrics are written by process 0
  only (`is_writer`); every process computes the same values.
* Shared files made once: `once(name, fn)` runs `fn` on process 0 while the
  others wait at a barrier, then lets every process go on (and read what it
  made from the shared workdir).

* A lost peer named: after an error, `lost_processes` asks JAX's
  coordination service which processes stopped answering.

On one process every function here is free: no barrier, always the writer.
"""

from __future__ import annotations

import threading
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


def lost_processes(timeout_s: float) -> list[int]:
  """The processes JAX's coordination service no longer hears from ([] on
  one process, when all answer, or when it cannot tell within `timeout_s`).

  Blocks until every live process has asked too, or a silent one has
  missed its heartbeat deadline (`sleep_jax.sharding.HEARTBEAT_TIMEOUT_S`);
  JAX's runtime may stop this process first with its own message, which
  names the lost task as well.
  """
  count = jax.process_count()
  if count == 1:
    return []
  # No public API names the live processes; the runtime's client does.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    return []
  answer = []
  asking = threading.Thread(
      target=lambda: answer.append(client.get_live_nodes(list(range(count)))),
      daemon=True)
  asking.start()
  asking.join(timeout_s)
  return sorted(set(range(count)) - set(answer[0])) if answer else []
