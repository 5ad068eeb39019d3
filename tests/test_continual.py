"""The main job, `python -m experiments.continual`: outputs, kill -9 and
resume, a corrupted checkpoint, held-out items that reach nothing, and a
method added in one place.

One uninterrupted smoke run of all fourteen methods, two seeds (the CI
variant), is the module's reference: it alone builds the world and trains
the base model. The other runs start from a copy of its `data/` and `base/`
(or of the whole workdir) and must reproduce its numbers: Sleep seed 1
alone, killed with SIGKILL during a sleep cycle and resumed (on one
process, then again on a corrupted newest checkpoint; and on two
processes); four methods with every held-out answer poisoned. The runs
share a compilation cache (conftest.compilation_cache).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import continual as continual_config
from sleep_jax import methods
from sleep_jax.studies import continual
from sleep_jax.studies import continual_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = '--config=experiments/configs/continual.py:smoke'


@pytest.fixture(scope='module')
def env(compilation_cache):
  # As on a user's laptop: one CPU device, not the suite's 8 fake ones, and
  # optimised programs (the base model trains for hundreds of steps).
  return {**{k: v for k, v in os.environ.items()
             if k not in ('XLA_FLAGS', 'JAX_DISABLE_MOST_OPTIMIZATIONS')},
          **compilation_cache}


def _command(workdir, *overrides):
  return [sys.executable, '-u', '-m', 'experiments.continual', SMOKE,
          f'--workdir={workdir}', *overrides]


def _run(env, workdir, *overrides, returncode=0):
  proc = subprocess.run(_command(workdir, *overrides), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  if proc.returncode != returncode:
    raise AssertionError(f'exit {proc.returncode}\n{proc.stdout}\n'
                         f'{proc.stderr[-3000:]}')
  return proc.stdout if returncode == 0 else proc.stderr


def _without_seconds(tree):
  if isinstance(tree, dict):
    return {k: _without_seconds(v) for k, v in tree.items()
            if k not in ('seconds', 'compile_seconds')}
  if isinstance(tree, list):
    return [_without_seconds(v) for v in tree]
  return tree


def _final_state(workdir, method, seed, cycle):
  path = os.path.join(workdir, 'checkpoints', method, f'seed_{seed}', str(cycle),
                      'state')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  workdir = str(tmp_path_factory.mktemp('reference'))
  proc = subprocess.run(
      _command(workdir, f'--config.methods={continual_config.ALL_METHODS}'),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Quiet by default: no library INFO logs, one line per cycle.
  assert not [l for l in proc.stderr.splitlines() if l[:1] in 'IW' and
              l[1:5].isdigit()], proc.stderr[:2000]
  lines = (proc.stdout + proc.stderr).splitlines()
  cycles = 2 * 2 * len(continual_config.ALL_METHODS)
  assert len(lines) < 2 * cycles + 30, len(lines)
  return workdir, proc.stdout


def _copy_of(reference_dir, tmp_path, parts=None):
  """A copy of the reference workdir (or of its `parts`: e.g. the data and
  the base-model cache, which a run of another config can reuse)."""
  workdir = str(tmp_path / 'copy')
  if parts is None:
    shutil.copytree(reference_dir, workdir)
  else:
    for part in parts:
      shutil.copytree(os.path.join(reference_dir, part),
                      os.path.join(workdir, part))
  return workdir


@pytest.mark.slow
def test_smoke_writes_every_output(reference):
  workdir, stdout = reference
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert list(results['methods']) == list(methods.METHODS)
  assert results['seeds'] == [0, 1] and results['config']['sessions'] == 2
  for name, entry in results['methods'].items():
    matrix = entry['acc_matrix']
    assert len(matrix) == 2 and matrix[0][1] is None
    assert all(0 <= a <= 1 for row in matrix for a in row if a is not None)
    finals = [run['final_acc'] for run in entry['per_seed']]
    assert entry['final_acc'] == pytest.approx(np.mean(finals))
    assert entry['final_acc_std'] == pytest.approx(np.std(finals, ddof=1))
    bwts = [run['acc_matrix'][1][0] - run['acc_matrix'][0][0]
            for run in entry['per_seed']]
    assert entry['bwt'] == pytest.approx(np.mean(bwts))
    assert [run['seed'] for run in entry['per_seed']] == [0, 1]
    assert entry['params'] > 0 and entry['seconds'] > 0
    # Headline scores: every item known after the last cycle, base included.
    items = results['items']
    for run in entry['per_seed']:
      pooled = (items['base'] * run['final_base_acc'] + sum(
          n * a for n, a in zip(items['sessions'], run['acc_matrix'][-1]))) / (
              items['base'] + sum(items['sessions']))
      assert run['final_acc_all'] == pytest.approx(pooled)
      # Two sessions: the best-ever on session 0 is its first value.
      assert run['forgetting'] == pytest.approx(
          run['acc_matrix'][0][0] - run['acc_matrix'][1][0])
    for key in ('final_acc_all', 'final_base_acc', 'forgetting'):
      assert entry[key] == pytest.approx(
          np.mean([run[key] for run in entry['per_seed']]))
      assert entry[f'{key}_std'] == pytest.approx(
          np.std([run[key] for run in entry['per_seed']], ddof=1))
    assert entry['base_acc'] == entry['final_base_acc']  # docs/design.md §8
    # Per-stage recall explains each cycle: after wake for every method
    # that learns in wake, then after each sleep stage it ran.
    stages = entry['per_seed'][0]['cycles'][-1]['stages']
    expected = {'seal': [], 'no_consolidation': ['wake']}.get(name)
    if expected is None:
      expected = (['wake'] + (['consolidation'] if
                              methods.METHODS[name].consolidates else []) +
                  (['dreaming'] if methods.METHODS[name].dreams else []))
    if name == 'seal':
      expected = ['dreaming']
    assert list(stages) == expected, name
    for values in stages.values():
      assert set(values) == {'session', 'base', 'session_probe'}
  # The smoke run learns: after wake, Sleep's fast expert and fine-tuning
  # recall the session's probe items (the forms its passages used) well
  # above chance, averaged over seeds and cycles.
  chance = results['chance']
  for name in ('sleep', 'finetune'):
    probe = [c['stages']['wake']['session_probe']
             for run in results['methods'][name]['per_seed']
             for c in run['cycles']]
    assert np.mean(probe) > 2.5 * chance, (name, probe)
  # The compute-matched baseline runs as many rows as a Sleep cycle.
  assert results['finetune_compute_steps'] == -(-continual_checks.sleep_training_rows(
      continual_config.get_config('smoke'), 4) // 8)
  # Sleep grows one slow expert per session; fine-tuning grows nothing.
  sleep_params = results['methods']['sleep']['params']
  assert sleep_params > results['methods']['finetune']['params']
  assert results['methods']['lora_finetune']['params'] > (
      results['methods']['finetune']['params'])
  report = open(os.path.join(workdir, 'report.md')).read()
  assert 'Continual fine-tuning' in report and 'Sleep w/o LTI' in report
  plots = sorted(os.listdir(os.path.join(workdir, 'plots')))
  assert len(plots) == 2 * len(methods.METHODS) + 1 and 'methods.png' in plots
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert any('sleep/seed1/acc_session1' in r for r in rows)
  assert any(f.startswith('events.out.tfevents') for f in
             os.listdir(os.path.join(workdir, 'tensorboard')))
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['methods'] == list(continual_config.ALL_METHODS)
  # One Orbax step per sleep cycle, with its lineage.
  seed_dir = os.path.join(workdir, 'checkpoints', 'sleep', 'seed_0')
  assert sorted(d for d in os.listdir(seed_dir) if d.isdigit()) == ['0', '1']
  meta = json.load(open(os.path.join(seed_dir, '1', 'metadata', 'metadata')))
  lineage = meta['lineage']
  assert lineage['parent_cycle'] == 0 and lineage['cycle'] == 1
  assert len(lineage['grown']) == 1 and lineage['reset']
  assert lineage['config_hash'] and lineage['code_version']
  assert 'ks_loss' in lineage['sleep_metrics']
  assert 'training the base model' in stdout
  assert results['finished'] and results['config']['smoke']
  assert len(results['complete']) == 2 * len(methods.METHODS)
  assert 'Smoke configuration' in report
  assert stdout.count('ETA') >= 2 * 2 * len(methods.METHODS)
  assert f'job {2 * 2 * len(methods.METHODS)}/' in stdout


@pytest.mark.slow
def test_rerun_keeps_other_results_and_refuses_another_config(reference, env,
                                                               tmp_path):
  """A re-run with fewer methods keeps every finished (method, seed) of the
  same config; a torn metrics.jsonl line and a stale plot do not survive;
  a run of another config or world in the same workdir is refused."""
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 1, "sleep/seed0/acc')  # an append cut by kill -9
  stale = os.path.join(workdir, 'plots', 'acc_matrix_gone.png')
  shutil.copy(os.path.join(workdir, 'plots', 'methods.png'), stale)
  stdout = _run(env, workdir, '--config.methods=("finetune",)',
                '--config.seeds=(1,)')
  assert 'skipped a torn last line' in stdout
  assert '[finetune seed 1] resuming after cycle 2' in stdout
  ref = json.load(open(os.path.join(ref_dir, 'results.json')))
  got = json.load(open(os.path.join(workdir, 'results.json')))
  assert set(got['methods']) == set(ref['methods'])
  for name in ref['methods']:
    assert (_without_seconds(got['methods'][name]['per_seed']) ==
            _without_seconds(ref['methods'][name]['per_seed'])), name
  assert got['finished'] and sorted(map(tuple, got['complete'])) == sorted(
      map(tuple, ref['complete']))
  assert not os.path.exists(stale)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  keys = [(r['step'], tuple(sorted(r))) for r in rows]
  assert len(keys) == len(set(keys))  # no duplicate rows
  stderr = _run(env, workdir, '--config.sleep.alpha=1.0',
                '--config.world.seed=1', returncode=2)
  assert stderr.startswith('error: ') and stderr.count('\n') == 1, stderr
  assert 'sleep.alpha: 0.5 -> 1.0' in stderr and 'world.seed: 0 -> 1' in stderr
  assert json.load(open(os.path.join(workdir, 'results.json'))) == got


@pytest.mark.slow
def test_divergence_without_nan_stops_naming_the_rate(reference, env,
                                                      tmp_path):
  """lr 1e6: the loss sits at or above ln V; the run stops with one line
  naming the method's own learning-rate key before writing its results."""
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path, parts=('data', 'base'))
  stderr = _run(env, workdir, '--config.methods=("finetune",)',
                '--config.seeds=(0,)',
                '--config.baselines.finetune_learning_rate=1e6', returncode=1)
  assert stderr.count('\n') == 1, stderr
  assert 'finetune (seed 0) diverged in wake' in stderr
  assert 'lower baselines.finetune_learning_rate (now 1000000.0)' in stderr
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  # That the corrected run may use this workdir (it finished nothing) is
  # tests/test_workdir.py's check_same_run test.


@pytest.mark.slow
def test_kill_resume_and_corrupt_checkpoint_equal_uninterrupted(reference, env,
                                                                tmp_path):
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path, parts=('data', 'base'))
  # Sleep seed 1 alone: seeds are independent runs, so its numbers and state
  # must equal seed 1's of the all-method reference.
  methods = ['--config.methods=("sleep",)', '--config.seeds=(1,)']
  proc = subprocess.Popen(_command(workdir, *methods), cwd=ROOT, env=env,
                          text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  for line in proc.stdout:
    if line.startswith('[sleep seed 1] cycle 1/2:'):
      # Cycle 1 is saved; cycle 2 has begun.
      os.kill(proc.pid, signal.SIGKILL)
      break
    assert time.time() < deadline, 'the first cycle never ended'
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  seed_dir = os.path.join(workdir, 'checkpoints', 'sleep', 'seed_1')
  assert sorted(d for d in os.listdir(seed_dir) if d.isdigit()) == ['0']
  assert not os.path.exists(os.path.join(workdir, 'results.json')) or (
      'sleep' not in json.load(open(os.path.join(workdir, 'results.json')))[
          'methods'])

  stdout = _run(env, workdir, *methods)
  assert 'reusing the base model' in stdout
  assert '[sleep seed 1] resuming after cycle 1' in stdout
  assert '[sleep seed 1] cycle 1/2' not in stdout  # finished before the kill

  def check_equal():
    ref = json.load(open(os.path.join(ref_dir, 'results.json')))
    got = json.load(open(os.path.join(workdir, 'results.json')))
    [ref_seed] = [r for r in ref['methods']['sleep']['per_seed']
                  if r['seed'] == 1]
    assert _without_seconds(got['methods']['sleep']['per_seed']) == [
        _without_seconds(ref_seed)]
    a = _final_state(ref_dir, 'sleep', 1, 1)
    b = _final_state(workdir, 'sleep', 1, 1)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
      np.testing.assert_array_equal(x, y)
  check_equal()

  # Flip 64 bytes in the middle of the largest data file of sleep seed 1's
  # newest step: Orbax alone would restore wrong numbers without a word;
  # the checksums say which checkpoint is damaged, and the rerun redoes
  # that cycle from the one before.
  newest = os.path.join(seed_dir, '1')
  _flip_bytes(newest)
  stdout = _run(env, workdir, *methods)
  assert f'checkpoint {newest} is unreadable' in stdout
  assert 'CorruptCheckpointError' in stdout
  assert '[sleep seed 1] resuming after cycle 1' in stdout
  assert '[sleep seed 1] cycle 2/2' in stdout
  check_equal()

  # Another config in the same workdir is refused, naming what differs.
  proc = subprocess.run(_command(workdir, *methods, '--config.sleep.num_steps=3'),
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
  assert 'sleep.num_steps: 2 -> 3' in proc.stderr
  check_equal()


def _flip_bytes(directory, count=64):
  """Inverts `count` bytes in the middle of the largest file under it."""
  files = [os.path.join(folder, name) for folder, _, names in
           os.walk(directory) for name in names]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(count)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in data))


# Runs the smoke job with every held-out item's answer replaced by another
# item's, and counts the evaluations of the true and the poisoned items.
_POISONED_RUN = """
import numpy as np
from absl import app
from experiments import continual as main
from sleep_jax import eval as eval_lib
from sleep_jax.studies import continual
from sleep_jax.studies import continual_checks

load, recall = continual.load_world, eval_lib.recall_accuracy
held_out, poison, seen = [], [], {'held_out': 0, 'poisoned': 0}

def poisoned(*args, **kwargs):
  world = load(*args, **kwargs)
  garbage = lambda items: {**items, 'targets': np.roll(items['targets'], 1, 0)}
  held_out.extend([world.base_items['targets']] +
                  [s.items['targets'] for s in world.sessions])
  world.base_items = garbage(world.base_items)
  for session in world.sessions:
    session.items = garbage(session.items)
  poison.extend([world.base_items['targets']] +
                [s.items['targets'] for s in world.sessions])
  return world

def spy(model, params, state, encoded, **kwargs):
  for key, arrays in (('held_out', held_out), ('poisoned', poison)):
    seen[key] += any(np.array_equal(encoded['targets'], a) for a in arrays)
  return recall(model, params, state, encoded, **kwargs)

continual.load_world, eval_lib.recall_accuracy = poisoned, spy
try:
  app.run(main.main)
finally:
  print('evaluations:', seen)
"""


@pytest.mark.slow
def test_held_out_items_leak_into_nothing_poisoned_run_trains_the_same(
    reference, env, tmp_path):
  """If a held-out item fed any training, reward or selection signal,
  replacing every held-out answer would change what some method trains.
  It restores the reference's base model: base training is given only
  `world.base_rows` (tests/test_held_out.py checks them)."""
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path, parts=('data', 'base'))
  methods = ('sleep', 'finetune_anchor', 'replay_all', 'seal')
  proc = subprocess.run(
      [sys.executable, '-u', '-c', _POISONED_RUN, SMOKE, f'--workdir={workdir}',
       f'--config.methods={methods}', '--config.seeds=(1,)'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The evaluation saw the poisoned items (so the check below is not
  # vacuous) and never the true ones: the base model once, each method's
  # 2 cycles (base + the sessions so far: 2 + 3), and each stage's session
  # and base recall (sleep 3 stages, the others 1): 1 + 4 * 5 + 2 * 2 * 6.
  seen = proc.stdout.split('evaluations: ')[-1].strip()
  assert seen == "{'held_out': 0, 'poisoned': 45}", seen
  for method in methods:
    a = _final_state(ref_dir, method, 1, 1)
    b = _final_state(workdir, method, 1, 1)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
      np.testing.assert_array_equal(x, y)


# A method added in one place: one `register` call, nothing else edited.
_EXTRA_METHOD_RUN = """
from absl import app
from experiments import continual as main
from sleep_jax import methods

methods.register(methods.Method('frozen'))  # no state, no wake, no sleep
app.run(main.main)
"""


@pytest.mark.slow
def test_a_registered_method_runs_in_the_main_job(reference, env, tmp_path):
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path, ['base', 'data'])
  proc = subprocess.run(
      [sys.executable, '-u', '-c', _EXTRA_METHOD_RUN, SMOKE,
       f'--workdir={workdir}', "--config.methods=('frozen',)",
       '--config.seeds=(1,)'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'training the base model' not in proc.stdout  # the cached one
  results = json.load(open(os.path.join(workdir, 'results.json')))
  entry = results['methods']['frozen']
  run = entry['per_seed'][0]
  assert len(run['cycles']) == 2 and not any(
      c['grown'] or c['reset'] or c['sleep'] or c['stages']
      for c in run['cycles'])
  # The model never changed: recall of the base population is the base
  # model's, measured before any method ran.
  assert run['final_base_acc'] == results['base']['acc']
  assert results['complete'] == [['frozen', 1]]


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_a_killed_process_stops_the_run_which_then_resumes(reference, env,
                                                          tmp_path):
  """`launch.local --processes=2` (one CPU device each, gloo) runs Sleep
  seed 1 on the reference's data and base model. kill -9 of process 1
  during a sleep cycle: the launcher exits non-zero naming it within a
  minute (process 0 does not hang in a collective); the same command then
  resumes from the last saved cycle on both processes, and the one
  results.json they write holds the single-process reference's numbers."""
  ref_dir, _ = reference
  workdir = _copy_of(ref_dir, tmp_path, parts=('data', 'base'))
  command = [sys.executable, '-m', 'launch.local', '--processes=2', '--',
             *_command(workdir, '--config.methods=("sleep",)',
                       '--config.seeds=(1,)')]
  proc = subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  pids, lines, killed_at = {}, [], None
  deadline = time.time() + 600
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('launch.local: process '):
      words = line.split()
      pids[int(words[2])] = int(words[-1])
    if killed_at is None and '[sleep seed 1] cycle 1/2:' in line:
      os.kill(pids[1], signal.SIGKILL)   # a sleep cycle has begun
      killed_at = time.time()
    assert time.time() < deadline, ''.join(lines[-20:])
  proc.wait(timeout=120)
  assert killed_at is not None, ''.join(lines[-20:])
  assert proc.returncode == 128 + signal.SIGKILL
  assert time.time() - killed_at < 60
  # The user's one line names the lost process, and process 0 stopped by
  # itself (no hang in a collective). What process 0 printed first is not
  # checked: JAX's runtime may abort it in native code before Python can
  # speak (launch/local.py, GRACE_S).
  assert re.fullmatch(
      r'error: process 1 of 2 failed \(killed by SIGKILL\); process 0 ended '
      r'on its own: (exit status \d+|killed by SIG[A-Z]+)\.', lines[-1].strip()
  ), lines[-5:]

  # Resumed, with every path each process writes logged (Python's audit
  # hooks): only process 0 writes the results.
  audit = tmp_path / 'writes'
  again = subprocess.run(
      command, cwd=ROOT, text=True, timeout=600, capture_output=True,
      env={**env, 'SLEEP_JAX_WRITE_AUDIT': str(audit), 'PYTHONPATH': os.pathsep.join(
          [os.path.join(ROOT, 'tests', 'testdata', 'write_audit'),
           env.get('PYTHONPATH', '')])})
  assert again.returncode == 0, again.stdout[-3000:]
  for i in range(2):
    assert f'[p{i}] [sleep seed 1] resuming after cycle 1' in again.stdout
  results_files = re.compile(
      r'/(results\.json|report\.md|metrics\.jsonl|run\.json)[^/]*$|'
      r'/(plots|tensorboard)(/|$)')
  written = [open(f'{audit}.{i}').read().split() for i in range(2)]
  ours = lambda paths: [p for p in paths if p.startswith(str(workdir))]
  assert [p for p in ours(written[0]) if results_files.search(p)]
  assert not [p for p in ours(written[1]) if results_files.search(p)], (
      ours(written[1]))
  ref = json.load(open(os.path.join(ref_dir, 'results.json')))
  got = json.load(open(os.path.join(workdir, 'results.json')))
  [ref_seed] = [r for r in ref['methods']['sleep']['per_seed']
                if r['seed'] == 1]
  [got_seed] = got['methods']['sleep']['per_seed']
  assert got_seed['acc_matrix'] == ref_seed['acc_matrix']
  np.testing.assert_allclose(
      np.asarray(jax_leaves(_without_seconds(got_seed)), float),
      np.asarray(jax_leaves(_without_seconds(ref_seed)), float), atol=1e-5)
  assert not [f for f in os.listdir(workdir) if f.endswith('.tmp')]
