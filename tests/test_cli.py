"""The command-line wrapper every `python -m experiments.*` shares
(sleep_jax.cli): one-line errors with the right exit status, the closest
config keys for a typo, --traceback, --help, and the workdir lock.

The subprocesses use configs that fail before any data is built (about a
second each); the wrapper's classification of errors is tested in-process.
"""

import errno
import os
import subprocess
import sys
import time

from absl import flags
from absl import logging
import pytest

from sleep_jax import cli
from sleep_jax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = '--config=experiments/configs/continual.py:smoke'

_HOLDER = '''
import sys, time
from sleep_jax import workdir
with workdir.lock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != 'SLEEP_JAX_TRACEBACK'}
  return {**env, **extra}


def _continual(*args, cwd=ROOT, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.continual', *args], cwd=cwd,
      env=env or _env(), capture_output=True, text=True, timeout=120)


def _one_error_line(proc) -> str:
  """The stderr of a refused run: exactly one line, `error: ...`."""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: '), proc.stderr
  assert 'Traceback' not in proc.stderr
  return lines[0]


@pytest.mark.slow
def test_unknown_key_names_the_closest_one(tmp_path):
  """A typo in an override says which key was meant, not a traceback."""
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}',
                    '--config.sleep.alphaa=1')
  assert proc.returncode == 2, proc.stderr
  line = _one_error_line(proc)
  assert 'sleep.alphaa' in line
  assert 'did you mean sleep.alpha' in line


@pytest.mark.parametrize('args, expected', [
    # A value the override's type cannot take: the flag and value named.
    (['--config.optimizer.learning_rate=fast'],
     'flag --config.optimizer.learning_rate=fast'),
    (['--config.dreaming.enabled=maybe'], 'flag --config.dreaming.enabled=maybe'),
    # List items: the bracket syntax, found or suggested.
    (['--config.model.cms_levels.0.width=8'], 'model.cms_levels[0].width'),
    (['--config.model.cms_levels[0].widht=8'],
     'did you mean model.cms_levels[0].width'),
    # A stray positional argument.
    (['extra'], "Unexpected arguments: ['extra']"),
    # A whole list, which ml_collections cannot parse.
    (["--config.model.cms_levels=[1,2]"],
     'config.model.cms_levels is a list, which cannot be given whole'),
    # A Python file that is not a config file.
    (['--config=sleep_jax/cli.py'],
     '--config=sleep_jax/cli.py: not a config file'),
])
@pytest.mark.slow
def test_flag_errors_name_the_flag(tmp_path, args, expected):
  """Errors absl and ml_collections raise while reading the command line
  (some at import) are one line naming what to fix, status 2."""
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}', *args)
  assert proc.returncode == 2, proc.stderr
  assert expected in _one_error_line(proc)


@pytest.mark.parametrize('args, expected', [
    (['--config.seeds=(-1,)'], 'seeds must be >= 0'),
    (['--config.optimizer.learning_rate=nan'],
     'optimizer.learning_rate=nan must be positive'),
    (['--config.optimizer.warmup_steps=100000'], 'base.train_steps=600'),
    (['--config=experiments/configs/continual.py:smok'],
     "--config=experiments/configs/continual.py:smok: Unknown variant 'smok'"),
])
@pytest.mark.slow
def test_values_checked_before_anything_is_built(tmp_path, args, expected):
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}', *args)
  assert proc.returncode == 2, proc.stderr
  assert expected in _one_error_line(proc)
  assert not os.path.exists(tmp_path / 'wd' / 'data')


@pytest.mark.slow
def test_train_lm_stop_after_must_be_a_step(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train_lm',
       '--config=experiments/configs/train_lm.py:smoke',
       f'--workdir={tmp_path / "wd"}', '--stop_after=-3'], cwd=ROOT,
      env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert '--stop_after=-3 must be >= 1' in _one_error_line(proc)


@pytest.mark.slow
def test_unusable_workdir_is_one_line_with_status_2(tmp_path):
  """A workdir path inside a file, or a name too long for the file system."""
  inside = tmp_path / 'a_file'
  inside.write_text('')
  for workdir in (inside / 'sub', tmp_path / ('x' * 300)):
    proc = _continual(SMOKE, f'--workdir={workdir}')
    assert proc.returncode == 2, proc.stderr
    assert f'--workdir={workdir} cannot be used' in _one_error_line(proc)


@pytest.mark.slow
def test_bad_value_is_one_line_with_status_2(tmp_path):
  """A config value the run rejects is a user error: one line, status 2."""
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}',
                    '--config.seeds=(0.5,)')
  assert proc.returncode == 2, proc.stderr
  assert 'seeds=(0.5,)' in _one_error_line(proc)


@pytest.mark.slow
def test_default_config_loads_from_another_directory(tmp_path):
  """The default --config is found next to the entry point, not relative to
  the cwd: the run gets as far as checking the config's values."""
  proc = _continual(f'--workdir={tmp_path / "wd"}', '--config.seeds=(0.5,)',
                    cwd=str(tmp_path), env=_env(PYTHONPATH=ROOT))
  assert proc.returncode == 2, proc.stderr
  line = _one_error_line(proc)
  assert 'seeds=(0.5,)' in line
  assert 'No such file' not in line


@pytest.mark.slow
def test_model_too_large_is_refused_before_building_data(tmp_path):
  """A model that cannot fit in memory is refused with its estimate before
  anything (the data) is built in the workdir."""
  workdir = tmp_path / 'wd'
  proc = _continual(SMOKE, f'--workdir={workdir}',
                    '--config.model.d_model=100000')
  assert proc.returncode == 2, proc.stderr
  line = _one_error_line(proc)
  assert 'does not fit' in line and 'GiB' in line
  assert 'model.d_model' in line
  assert not os.path.exists(workdir / 'data')


@pytest.mark.slow
def test_workdir_that_is_a_file(tmp_path):
  """--workdir naming a file says so in one line."""
  path = tmp_path / 'a_file'
  path.write_text('not a directory')
  proc = _continual(SMOKE, f'--workdir={path}')
  assert proc.returncode == 2, proc.stderr
  assert 'is a file' in _one_error_line(proc)
  assert path.read_text() == 'not a directory'


@pytest.mark.slow
def test_traceback_flag_shows_the_traceback(tmp_path):
  """--traceback turns the one line of a config error back into Python's
  traceback, for debugging."""
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}',
                    '--config.seeds=(0.5,)', '--traceback')
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr
  assert 'ValueError: seeds=(0.5,)' in proc.stderr


@pytest.mark.slow
def test_traceback_env_var_shows_the_traceback_of_a_flag_error(tmp_path):
  """SLEEP_JAX_TRACEBACK=1 does the same, also for errors in parsing flags."""
  proc = _continual(SMOKE, f'--workdir={tmp_path / "wd"}',
                    '--config.sleep.alphaa=1',
                    env=_env(SLEEP_JAX_TRACEBACK='1'))
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr
  assert 'alphaa' in proc.stderr


@pytest.mark.slow
def test_help_names_the_variants_and_the_override_syntax():
  """--help is where a user learns the variants and how to override keys."""
  proc = _continual('--help')
  text = proc.stdout + proc.stderr
  assert 'error:' not in text and 'Traceback' not in text
  assert 'smoke' in text and 'full' in text
  assert '--config.<key>' in text


@pytest.mark.slow
def test_missing_config_file_with_override_is_one_line(tmp_path):
  """A --config path that does not exist is one line naming it."""
  proc = _continual('--config=no/such/config.py:smoke',
                    f'--workdir={tmp_path / "wd"}', '--config.seeds=(1,)')
  assert proc.returncode == 2, proc.stderr
  assert 'no/such/config.py' in _one_error_line(proc)


@pytest.mark.slow
def test_missing_config_file_is_one_line(tmp_path):
  """The same without overrides: the usual way to mistype a path."""
  proc = _continual('--config=no/such/config.py:smoke',
                    f'--workdir={tmp_path / "wd"}')
  assert proc.returncode == 2, proc.stderr
  assert 'no/such/config.py' in _one_error_line(proc)


@pytest.mark.slow
def test_busy_workdir_is_refused_at_once_naming_the_holder(tmp_path):
  """A second run on a workdir in use stops at once, naming the PID of the
  process that holds it, instead of writing over its files."""
  workdir = tmp_path / 'wd'
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    start = time.monotonic()
    proc = _continual(SMOKE, f'--workdir={workdir}')
    elapsed = time.monotonic() - start
  finally:
    holder.kill()
    holder.wait()
  # A run that cannot start now is a failed run (status 1), not a user error.
  assert proc.returncode == 1, proc.stderr
  line = _one_error_line(proc)
  assert f'PID {holder.pid}' in line
  assert elapsed < 30  # refused, not waiting for the lock
  assert sorted(os.listdir(workdir)) == ['.lock']


# In-process: how `_guarded` classifies what main raised.


@pytest.fixture
def guarded(monkeypatch):
  """`cli._guarded(main, None)` run with tracebacks off; restores the log
  verbosity it sets."""
  monkeypatch.delenv('SLEEP_JAX_TRACEBACK', raising=False)
  if flags.FLAGS.is_parsed():
    monkeypatch.setattr(flags.FLAGS, 'traceback', False)
  verbosity = logging.get_verbosity()

  def run(error):
    def main(argv):
      del argv
      raise error
    cli._guarded(main, None)(['prog'])  # pylint: disable=protected-access

  yield run
  logging.set_verbosity(verbosity)


def _status(guarded, error):
  with pytest.raises(SystemExit) as exit_info:
    guarded(error)
  return exit_info.value.code


def test_full_disk_is_one_line_with_status_1(guarded, capsys):
  """A full disk is not a bug: one line saying so and that a re-run
  resumes."""
  error = OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt/3')
  assert _status(guarded, error) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ')
  assert 'no space left' in err and '/w/ckpt/3' in err
  assert 'Traceback' not in err


def test_full_disk_inside_a_library_error_is_the_same_line(guarded, capsys):
  """Orbax and TensorStore re-raise ENOSPC as errors of their own (a
  ValueError would otherwise read as a config error, status 2)."""
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt/3')
    except OSError as cause:
      raise ValueError('Error writing "d/1f3a": write failed') from cause
  except ValueError as wrapped:
    error = wrapped
  assert _status(guarded, error) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'no space left' in err
  assert _status(guarded, RuntimeError(
      'INTERNAL: Error writing: No space left on device [errno 28]')) == 1
  assert 'no space left' in capsys.readouterr().err


def test_ctrl_c_is_one_line_saying_how_to_resume(guarded, capsys,
                                                 monkeypatch):
  """Ctrl-C is not an error in the code: status 130, one line."""
  monkeypatch.setattr(cli, '_hard_exit', sys.exit)
  assert _status(guarded, KeyboardInterrupt()) == 130
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'run the same command again' in err


@pytest.mark.parametrize('error, status, text', [
    (ValueError('sessions=0: must be at least 1'), 2, 'sessions=0'),
    (KeyError('no method "x"'), 2, 'no method "x"'),
    (FileNotFoundError('/data/x.txt is missing'), 2, '/data/x.txt'),
    (training.DivergenceError('the loss is nan at step 3'), 1, 'step 3'),
    (cli.RunFailed('cannot go on'), 1, 'cannot go on'),
])
def test_errors_are_one_line_with_their_status(guarded, capsys, error, status,
                                               text):
  """User errors exit 2, failed runs 1; both with one line, no traceback."""
  assert _status(guarded, error) == status
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: '), err
  assert text in err
  assert 'Traceback' not in err


def test_bug_shows_its_traceback(guarded, capsys):
  """An unexpected exception is a bug: its traceback stays visible."""
  assert _status(guarded, RuntimeError('index out of range')) == 1
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' in err
  assert 'RuntimeError: index out of range' in err
  assert 'a bug' in err


def test_env_var_reraises_the_original_error(guarded, monkeypatch):
  """SLEEP_JAX_TRACEBACK=1: the exception itself propagates, not SystemExit."""
  monkeypatch.setenv('SLEEP_JAX_TRACEBACK', '1')
  with pytest.raises(ValueError, match='sessions=0'):
    guarded(ValueError('sessions=0'))
