"""A workdir belongs to one process and one config (sleep_jax.workdir): the
lock refuses a second process at once and never outlives its holder;
check_same_run refuses another config naming what differs."""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = '''
import sys, time
from sleep_jax import workdir
with workdir.lock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


def _start_holder(path):
  """A child process holding the lock on `path`, once it says so."""
  env = {k: v for k, v in os.environ.items() if k != 'SLEEP_JAX_TRACEBACK'}
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(path)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline().strip()
  if line != 'locked':
    proc.kill()
    proc.wait()
    raise AssertionError(f'the holder did not take the lock: {line!r}')
  return proc


def test_second_process_is_refused_and_kill_9_frees_the_lock(tmp_path):
  """Another process's lock refuses us at once naming its PID; once that
  process is killed with SIGKILL its stale lock file no longer blocks."""
  path = tmp_path / 'wd'
  holder = _start_holder(path)
  try:
    with pytest.raises(workdir.WorkdirBusy, match=f'PID {holder.pid} '):
      with workdir.lock(str(path)):
        pytest.fail('took a lock another process holds')
  finally:
    holder.kill()
    holder.wait()
  assert (path / '.lock').read_text().strip() == str(holder.pid)
  with workdir.lock(str(path)):
    assert (path / '.lock').read_text().strip() == str(os.getpid())


def test_lock_is_exclusive_and_released_on_exit(tmp_path):
  """While held, a second lock (even from this process) is refused; after
  the block, the workdir can be locked again."""
  path = str(tmp_path / 'wd')
  with workdir.lock(path):
    with pytest.raises(workdir.WorkdirBusy, match=f'PID {os.getpid()} '):
      with workdir.lock(path):
        pass
  with workdir.lock(path):
    pass


def test_lock_releases_when_the_block_raises(tmp_path):
  """An error inside the block does not leave the workdir locked."""
  path = str(tmp_path / 'wd')
  with pytest.raises(KeyError):
    with workdir.lock(path):
      raise KeyError('boom')
  with workdir.lock(path):
    pass


def test_prepare_refuses_a_file_and_creates_directories(tmp_path):
  """--workdir naming a file is a clear error; a new path is created."""
  file = tmp_path / 'file'
  file.write_text('x')
  with pytest.raises(NotADirectoryError, match='is a file'):
    workdir.prepare(str(file))
  with pytest.raises(NotADirectoryError):
    with workdir.lock(str(file)):
      pass
  assert file.read_text() == 'x'
  nested = tmp_path / 'a' / 'b'
  workdir.prepare(str(nested))
  assert nested.is_dir()


_IDENTITY = {'sessions': 3, 'seeds_unused': (0, 1),
             'model': {'d_model': 96, 'levels': [{'width': 64}]},
             'sleep': {'alpha': 0.5, 'lmbda': 0.0}}


def test_check_same_run_records_then_accepts_the_same_config(tmp_path):
  """The first run records its identity; the same one (tuples read back as
  lists) is accepted."""
  path = str(tmp_path)
  workdir.check_same_run(path, _IDENTITY, results=None)
  with open(tmp_path / 'run.json') as f:
    recorded = json.load(f)
  assert recorded['model'] == {'d_model': 96, 'levels': [{'width': 64}]}
  workdir.check_same_run(path, _IDENTITY, results={})
  workdir.check_same_run(path, {**_IDENTITY, 'seeds_unused': [0, 1]},
                         results={})


def test_check_same_run_names_every_differing_key(tmp_path):
  """Another config in a workdir with results is refused naming each
  differing (nested) key with its old and new value, and run.json keeps the
  first config."""
  path = str(tmp_path)
  workdir.check_same_run(path, _IDENTITY, results=None)
  before = (tmp_path / 'run.json').read_text()
  other = {**_IDENTITY, 'model': {'d_model': 128, 'levels': [{'width': 64}]},
           'sleep': {'alpha': 1.0, 'lmbda': 0.0}}
  with pytest.raises(ValueError) as error:
    workdir.check_same_run(path, other, results={})
  message = str(error.value)
  assert 'model.d_model: 96 -> 128' in message
  assert 'sleep.alpha: 0.5 -> 1.0' in message
  assert 'lmbda' not in message and 'sessions' not in message
  assert (tmp_path / 'run.json').read_text() == before


def test_check_same_run_names_added_and_removed_keys(tmp_path):
  """A key only one of the two configs has is a difference too."""
  path = str(tmp_path)
  workdir.check_same_run(path, {'a': 1, 'b': {'c': 2}}, results=None)
  with pytest.raises(ValueError) as error:
    workdir.check_same_run(path, {'a': 1, 'b': {'d': 3}}, results={})
  message = str(error.value)
  assert 'b.c: 2 -> <absent>' in message
  assert 'b.d: <absent> -> 3' in message


def test_check_same_run_falls_back_on_the_results_config(tmp_path):
  """run.json deleted or damaged: the results' own config stands in for it,
  so a run of another config is still refused."""
  path = str(tmp_path)
  results = {'config': {**_IDENTITY, 'methods': ['sleep'], 'seeds': [0]}}
  for damage in (None, '{'):
    if damage is not None:
      (tmp_path / 'run.json').write_text(damage)
    with pytest.raises(ValueError, match='sleep.alpha: 0.5 -> 1.0'):
      workdir.check_same_run(path, {**_IDENTITY, 'sleep': {
          'alpha': 1.0, 'lmbda': 0.0}}, results=results)
  # The same config passes, compiler keys (absent from the config) aside.
  workdir.check_same_run(path, {**_IDENTITY, 'xla_optimize': False},
                         results=results)


def test_check_same_run_lists_at_most_four_differences(tmp_path):
  """Many differences: four shown and how many more, to stay one line."""
  path = str(tmp_path)
  workdir.check_same_run(path, {f'k{i}': i for i in range(6)},
                         results=None)
  with pytest.raises(ValueError) as error:
    workdir.check_same_run(path, {f'k{i}': -i - 1 for i in range(6)},
                           results={})
  message = str(error.value)
  assert 'k3: 3 -> -4; and 2 more' in message and 'k4' not in message
  assert '\n' not in message


def test_workdir_without_results_takes_a_new_config(tmp_path):
  """A run that finished nothing (it failed) does not hold its workdir: a
  new config is accepted and recorded, and is then the one compared."""
  path = str(tmp_path)
  workdir.check_same_run(path, {'lr': 1e6}, results=None)
  workdir.check_same_run(path, {'lr': 1e-3}, results=None)
  with open(tmp_path / 'run.json') as f:
    assert json.load(f) == {'lr': 1e-3}
  workdir.check_same_run(path, {'lr': 1e-3}, results={})
  with pytest.raises(ValueError, match='lr: 0.001 -> 1000000.0'):
    workdir.check_same_run(path, {'lr': 1e6}, results={})
