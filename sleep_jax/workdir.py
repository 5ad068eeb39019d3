"""A workdir belongs to one process and one experiment at a time.

`lock(workdir)` takes an advisory `fcntl` lock on `<workdir>/.lock` before
anything is written there: a second process on the same workdir is refused
at once, naming the holder's PID. The kernel drops the lock when its holder
dies, even by `kill -9`, so a stale lock file never blocks a new run.

`check_same_run(workdir, identity, results)` refuses to run in a
workdir that holds results of another config (`identity`: every key that
decides the numbers), naming the keys that differ: results of two configs
are never mixed in one results.json, nor one reported under the other's
name. A workdir whose earlier run finished nothing (it failed, e.g.
diverged) takes the new config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

_LOCK = '.lock'
_IDENTITY = 'run.json'


class WorkdirBusy(RuntimeError):
  """Another process holds the workdir."""


def _unusable(workdir: str, e: OSError) -> ValueError:
  return ValueError(f'--workdir={workdir} cannot be used ({e.strerror}: '
                    f'{e.filename}); pass a directory path this user can '
                    'write to.')


def prepare(workdir: str) -> None:
  """Creates `workdir`; one clear error if that path is a file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a '
                             'directory; pass a directory path.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise _unusable(workdir, e) from e


def require_directories(workdir: str, names) -> None:
  """Raises ValueError if any `<workdir>/<name>` the run writes as a
  directory is something else."""
  for name in names:
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f'{path} is a file, but the run writes a directory '
                       'there; move it aside.')


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `<workdir>/.lock` for the duration (process 0 only: on a pod the
  other processes do not write to the workdir)."""
  prepare(workdir)
  import jax  # pylint: disable=g-import-not-at-top  (flag errors skip it)
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, _LOCK)
  try:
    f = open(path, 'a+', encoding='utf-8')
  except OSError as e:
    raise _unusable(workdir, e) from e
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise WorkdirBusy(f'--workdir={workdir} is in use by PID {holder} '
                        f'({path}); wait for it to finish, or pass another '
                        '--workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'{os.getpid()}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _differences(old, new, prefix='') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _differences(old.get(key, '<absent>'), new.get(key, '<absent>'),
                          f'{prefix}{key}.')
    return out
  return [] if old == new else [f'{prefix[:-1]}: {old} -> {new}']


def _recorded(path: str) -> dict | None:
  # Imported here, like jax in lock(): flag errors skip loading JAX.
  from sleep_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  try:
    return metrics_lib.read_json(path)
  except (OSError, ValueError):
    return None


def check_same_run(workdir: str, identity: dict,
                   results: dict | None) -> None:
  """Records `identity` in `<workdir>/run.json`, or raises ValueError if
  the workdir holds `results` (its results.json, None if none) of another
  one. Without a readable run.json, the identity is that of the results'
  own `config`."""
  path = os.path.join(workdir, _IDENTITY)
  identity = json.loads(json.dumps(identity))  # tuples read back as lists
  recorded = _recorded(path)
  if results is not None:
    earlier, now = recorded, identity
    if earlier is None:
      # Compiler settings are not in the config: compared only via run.json.
      earlier = {k: v for k, v in json.loads(json.dumps(
          results.get('config', {}))).items() if k in identity}
      now = {k: v for k, v in identity.items() if k in earlier}
    differ = _differences(earlier, now)
    if differ:
      shown = '; '.join(differ[:4]) + (f'; and {len(differ) - 4} more'
                                       if len(differ) > 4 else '')
      raise ValueError(
          f'--workdir={workdir} holds the results of another config ({shown})'
          '; a run there would mix or mislabel them: pass another --workdir '
          f'(or move {workdir} aside).')
    if recorded is not None:
      return
  from sleep_jax import multihost  # pylint: disable=g-import-not-at-top
  if not multihost.is_writer():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(identity, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
