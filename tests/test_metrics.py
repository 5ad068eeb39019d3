"""Tests for sleep_jax.metrics: metrics.jsonl survives torn appends, resumes
and recomputed steps."""

from __future__ import annotations

import json

import pytest

from sleep_jax import metrics


def _write_lines(path, text: str) -> None:
  path.write_text(text, encoding='utf-8')


def _rows(path) -> list[dict]:
  """The file's rows, parsed strictly: every line whole."""
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_torn_last_line_skipped_reported_and_repaired(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  # What kill -9 mid-append leaves: a partial object, no trailing newline.
  _write_lines(path, '{"step": 1, "a": 0.5}\n{"step": 2, "a": 0.25}\n'
               '{"step": 3, "a": 0.1')
  logged = []
  assert metrics.read_jsonl(str(path), log=logged.append) == [
      {'step': 1, 'a': 0.5}, {'step': 2, 'a': 0.25}]
  assert len(logged) == 1 and f'{path}:3:' in logged[0], logged

  logged.clear()
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2**62,
                                log=logged.append)
  assert len(logged) == 1 and f'{path}:3:' in logged[0], logged
  # Repaired on open: only the whole rows remain.
  assert _rows(path) == [{'step': 1, 'a': 0.5}, {'step': 2, 'a': 0.25}]
  writer.write(3, {'a': 0.75})
  writer.close()
  # The new row is a line of its own, not glued onto the torn one.
  assert _rows(path) == [{'step': 1, 'a': 0.5}, {'step': 2, 'a': 0.25},
                         {'step': 3, 'a': 0.75}]
  logged.clear()
  assert metrics.read_jsonl(str(path), log=logged.append) == _rows(path)
  assert not logged


def test_torn_line_in_the_middle_raises_naming_the_file(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write_lines(path, '{"step": 1, "a": 0.5}\n{"step": 2, "a\n'
               '{"step": 3, "a": 0.1}\n')
  with pytest.raises(ValueError, match=r'metrics\.jsonl:2: .*move the file '
                     'aside') as error:
    metrics.read_jsonl(str(path), log=lambda _: None)
  assert str(path) in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(ValueError, match=r'metrics\.jsonl:2: '):
    metrics.MetricWriter(str(tmp_path), log=lambda _: None)
  # The file is left as it was, for whoever moves it aside.
  assert path.read_text().count('\n') == 3


def test_same_step_and_keys_replaced_other_keys_kept(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2**62)
  writer.write(0, {'sleep/seed0/acc': 0.1})
  writer.write(0, {'finetune/seed0/acc': 0.2})  # other keys, same step
  writer.write(1, {'sleep/seed0/acc': 0.3})
  writer.write(0, {'sleep/seed0/acc': 0.4})  # cycle 0 of sleep recomputed
  writer.write(2, {'sleep/seed0/acc': 0.5})  # appends after a replacement
  writer.close()
  assert _rows(path) == [{'step': 0, 'sleep/seed0/acc': 0.4},
                         {'step': 0, 'finetune/seed0/acc': 0.2},
                         {'step': 1, 'sleep/seed0/acc': 0.3},
                         {'step': 2, 'sleep/seed0/acc': 0.5}]
  # The rows written before a restart are replaced too.
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2**62)
  writer.write(1, {'sleep/seed0/acc': 0.6})
  writer.close()
  assert [r['sleep/seed0/acc'] for r in _rows(path) if 'sleep/seed0/acc' in r
          ] == [0.4, 0.6, 0.5]


def test_resume_step_drops_later_rows(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  writer = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 5):
    writer.write(step, {'loss': float(step)})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
  assert [r['step'] for r in _rows(path)] == [1, 2]
  writer.write(3, {'loss': 9.0})
  writer.close()
  assert _rows(path) == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0},
                         {'step': 3, 'loss': 9.0}]
