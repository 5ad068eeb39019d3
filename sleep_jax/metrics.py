"""Run metrics: `metrics.jsonl` + TensorBoard events, progress lines, and
result files written whole or not at all."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
from jax import monitoring
import numpy as np

from sleep_jax import multihost


def write_json(path: str, value) -> None:
  """Writes `value` as JSON to `path` through a temporary file, so a crash
  mid-write leaves the previous version whole."""
  if not multihost.is_writer():
    return  # every process holds the same values
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  """The JSON object in `path`; ValueError naming the file if it does not
  read back as one (cut short by a full disk or a kill)."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} does not read back ({e})') from e
  if not isinstance(value, dict):
    raise ValueError(f'{path} does not read back (not a JSON object)')
  return value


def read_jsonl(path: str, log=print) -> list[dict]:
  """The rows of a metrics.jsonl file.

  A torn last line, what kill -9 or a full disk leaves in the middle of an
  append, is skipped with one log line: every row before it is whole. A
  malformed line before the last cannot come from an interrupted append, so
  it raises ValueError naming the file and line.
  """
  # A torn multi-byte character must read as a malformed line, not raise.
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.readlines()
  last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
  rows = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict):
      rows.append(row)
    elif lineno == last:
      log(f'{path}:{lineno}: skipped a torn last line (an append cut short '
          'by a kill or a full disk); the rows before it are whole')
    else:
      raise ValueError(
          f'{path}:{lineno}: not a JSON object ({line.strip()[:40]!r}) and '
          'not the last line, so not a torn append; fix: move the file aside')
  return rows


class MetricWriter:
  """Appends one JSON object per step to `<workdir>/metrics.jsonl` and writes
  the same scalars as TensorBoard events under `<workdir>/tensorboard`.

  Only process 0 writes. Lines are flushed immediately so a crash loses
  nothing already logged. A row with the step and keys of an earlier one
  (a cycle recomputed after a resume) replaces it rather than repeating it.
  """

  def __init__(self, workdir: str, resume_step: int = 0, log=print):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    rows = (read_jsonl(self.jsonl_path, log)
            if os.path.exists(self.jsonl_path) else [])
    # A resumed run redoes the steps after its checkpoint: drop their rows.
    # Keyed by step and keys, in file order, so a recomputed row finds the
    # one it replaces without a scan.
    self._rows = {_row_key(r): r for r in rows if r['step'] <= resume_step}
    self._jsonl = None
    # Rewritten even when nothing was dropped: an append after a torn last
    # line would glue the new row onto it.
    self._rewrite()
    from tensorboardX import SummaryWriter  # heavy import, only when writing
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def _rewrite(self) -> None:
    """Writes the kept rows whole (a crash leaves the previous file) and
    reopens the file for appending: the old handle points at the old file."""
    if self._jsonl is not None:
      self._jsonl.close()
    tmp = self.jsonl_path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in self._rows.values())
    os.replace(tmp, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    key = _row_key(row)
    replaces = key in self._rows
    self._rows[key] = row  # a replaced row keeps its place
    if replaces:
      self._rewrite()
    else:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    for k, v in row.items():
      if k != 'step':
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def _row_key(row: dict) -> tuple:
  """What makes two rows the same measurement: the step and which scalars."""
  return row['step'], frozenset(row)


def check_finite(step: int, scalars: Mapping[str, float]) -> None:
  """Raises FloatingPointError naming the step and metric if any is NaN/inf."""
  for name, value in scalars.items():
    value = float(np.asarray(value))
    if not math.isfinite(value):
      raise FloatingPointError(
          f'Training diverged at step {step}: metric {name!r} is {value}. '
          'Lower optimizer.learning_rate, raise optimizer.warmup_steps or '
          'tighten optimizer.grad_clip, then resume from the last checkpoint.')


class Progress:
  """Logs `step i/n (x%), steps/s, ETA, <metrics>` lines at an interval."""

  def __init__(self, total_steps: int, first_step: int = 0,
               every_seconds: float = 30.0, what: str = 'step'):
    self._total = total_steps
    self._what = what
    self._every = every_seconds
    self._t0 = self._last = time.perf_counter()
    self._first = first_step

  def update(self, step: int, scalars: Mapping[str, float] | None = None,
             force: bool = False) -> str | None:
    now = time.perf_counter()
    if not force and now - self._last < self._every:
      return None
    self._last = now
    done = step - self._first
    rate = done / max(now - self._t0, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float('inf')
    parts = [f'{self._what} {step}/{self._total} '
             f'({100.0 * step / max(self._total, 1):.0f}%)',
             f'{rate:.2f} {self._what}s/s', f'ETA {format_seconds(eta)}']
    parts += [f'{k}={float(np.asarray(v)):.4g}' for k, v in (scalars or {}).items()]
    line = ' | '.join(parts)
    print(line, flush=True)
    return line


def format_seconds(seconds: float) -> str:
  """`1h02m03s`; '?' if not finite."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


_compiling = [0.0]


def _count_compile(event: str, seconds: float, **_) -> None:
  if event.startswith('/jax/core/compile/'):
    _compiling[0] += seconds


monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
  """Seconds this process has spent tracing, lowering and compiling JAX
  programs so far: the part of a wall time that a second run of the same
  shapes would not pay."""
  return _compiling[0]
