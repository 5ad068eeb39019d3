"""Tests only: with this folder on PYTHONPATH and SLEEP_JAX_WRITE_AUDIT
set, Python loads this at start-up and logs every path the process opens
for writing, renames onto or makes as a directory, one absolute path a
line, to `$SLEEP_JAX_WRITE_AUDIT.<JAX_PROCESS_ID>` (through Python's audit
hooks, so nothing in the code under test is patched). Writes done in
native code (TensorStore's checkpoint files) are not seen."""

import os
import sys

_LOG = os.environ.get('SLEEP_JAX_WRITE_AUDIT')
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _path_written(event, args):
  if event == 'open':
    path, mode, flags = args
    if isinstance(mode, str):
      return path if set(mode) & set('wax+') else None
    return path if isinstance(flags, int) and flags & _WRITE_FLAGS else None
  if event == 'os.rename':
    return args[1]
  if event == 'os.mkdir':
    return args[0]
  return None


if _LOG:
  _fd = os.open(f'{_LOG}.{os.environ.get("JAX_PROCESS_ID", "0")}',
                os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def _hook(event, args):
    path = _path_written(event, args)
    if isinstance(path, (str, bytes, os.PathLike)):
      os.write(_fd, (os.path.abspath(os.fsdecode(path)) + '\n').encode())

  sys.addaudithook(_hook)
