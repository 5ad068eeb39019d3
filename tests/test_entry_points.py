"""The command lines a user types: train_lm (with overrides, resume) and the
benchmark's output format."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True, env=None):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT,
                        env={**os.environ, **(env or {})},
                        capture_output=True, text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}')
  return proc


@pytest.mark.slow
def test_train_lm_smoke_with_overrides_then_resume(tmp_path,
                                                   compilation_cache):
  workdir = str(tmp_path / 'run')
  args = ['experiments.train_lm',
          '--config=experiments/configs/train_lm.py:smoke', f'--workdir={workdir}',
          '--config.num_train_steps=4', '--config.data.num_documents=300',
          '--config.checkpoint_every_steps=2', '--config.log_every_steps=1',
          '--config.optimizer.warmup_steps=1']
  first = _run(*args, '--stop_after=2', env=compilation_cache)
  assert 'step 2/2' in first.stdout
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['num_train_steps'] == 4 and saved['data']['num_documents'] == 300
  second = _run(*args, env=compilation_cache)
  assert 'resumed from checkpoint step 2' in second.stdout
  assert re.search(r'step 4/4 .*steps/s \| ETA', second.stdout)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 4 and final['sample'].startswith('Ada lives in')
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_train_lm_bad_override_names_the_key(tmp_path):
  proc = _run('experiments.train_lm',
              '--config=experiments/configs/train_lm.py:smoke',
              f'--workdir={tmp_path / "bad"}', '--config.model.num_kv_heads=3',
              check=False)
  assert proc.returncode != 0
  assert 'num_heads=4 must be a multiple of num_kv_heads=3' in proc.stderr


@pytest.mark.slow
def test_benchmark_prints_mfu_and_sampling_ratio_last():
  proc = _run('benchmarks.lm', '--d_model=64', '--num_layers=1',
              '--vocab_size=256', '--batch=8', '--seq_len=16', '--steps=1',
              '--matmul_size=256', '--sample_batch=2', '--prompt_len=4',
              '--new_tokens=8')
  lines = proc.stdout.strip().splitlines()
  assert re.fullmatch(r'device: cpu .* x\d+, matmul precision: default',
                      lines[0])
  assert re.fullmatch(r'MFU: \d+(\.\d+)?%', lines[-2])
  assert re.fullmatch(r'sampling speedup cached/recompute: \d+(\.\d+)?x', lines[-1])


@pytest.mark.slow
def test_dreaming_benchmark_prints_both_ways_and_the_ratio_last():
  proc = _run('benchmarks.dreaming',
              '--config=experiments/configs/dreaming.py:smoke', '--n=2,3',
              '--repeats=1', '--matmul_size=256')
  lines = proc.stdout.strip().splitlines()
  number = r'\d+(\.\d+)?'
  assert re.fullmatch(r'device: cpu .* x\d+, matmul precision: default',
                      lines[0])
  for n, line in zip((2, 3), lines[-3:-1]):
    assert re.fullmatch(rf'N= *{n}: vmapped +{number} ms \( *{number} '
                        rf'GFLOP/s\), sequential +{number} ms \( *{number} '
                        rf'GFLOP/s\); +{number} vs +{number} dreams/s', line)
  assert re.fullmatch(rf'dreaming speedup vmapped/sequential at N=3: {number}x',
                      lines[-1])


def _on_two_processes(args, first_workdir, workdir, env):
  """`python -m *args` (its --workdir last) under `launch.local
  --processes=2 --devices-per-process=4` (the suite's 8 devices, split over
  two processes) in `workdir`, restoring the base model `first_workdir`
  trained; returns its results.json."""
  shutil.copytree(first_workdir / 'base', workdir / 'base')
  proc = _run('launch.local', '--processes=2', '--devices-per-process=4',
              '--', sys.executable, '-m', *args[:-1], f'--workdir={workdir}',
              env=env)
  for i in range(2):
    assert f'[p{i}] reusing the base model' in proc.stdout
  return json.load(open(workdir / 'results.json'))


def _assert_same_numbers(got, want, where=''):
  """Equal structure and values, floats within 1e-6 (timings skipped)."""
  if isinstance(want, dict):
    assert sorted(got) == sorted(want), where
    for k in want:
      if 'seconds' not in k:
        _assert_same_numbers(got[k], want[k], f'{where}/{k}')
  elif isinstance(want, list):
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_same_numbers(g, w, f'{where}[{i}]')
  elif isinstance(want, float) and not isinstance(got, bool):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
  else:
    assert got == want, where


@pytest.mark.slow
def test_cms_recall_smoke_writes_results(tmp_path, compilation_cache):
  args = ['experiments.cms_recall',
          '--config=experiments/configs/cms_recall.py:smoke',
          f'--workdir={tmp_path}']
  proc = _run(*args, env=compilation_cache)
  results = json.load(open(tmp_path / 'results.json'))
  for method in ('frozen', 'online'):
    acc = results['methods'][method]['acc_matrix']
    assert len(acc) == 2 and acc[0][1] is None and 0 <= acc[1][0] <= 1
  assert 0 <= results['base_recall'] <= 1
  assert 'method   | recall' in proc.stdout
  base, = os.listdir(tmp_path / 'base')  # kept for a re-run
  assert os.path.isdir(tmp_path / 'base' / base / 'params')
  # Run again (as after a crash): the base model is restored, not retrained,
  # and the finished methods are kept, not lived through again.
  again = _run(*args, env=compilation_cache)
  assert 'reusing the base model' in again.stdout
  assert 'base step' not in again.stdout
  assert 'after session' not in again.stdout
  for method in ('frozen', 'online'):
    assert f'[{method}] kept from' in again.stdout
  rerun = json.load(open(tmp_path / 'results.json'))
  assert rerun['methods'] == results['methods']
  assert rerun['other_methods'] == {}
  assert rerun['base_model'] == results['base_model']
  assert rerun['base_recall'] == results['base_recall']
  # The same study as two JAX processes: the same numbers.
  two = _on_two_processes(args, tmp_path,
                         tmp_path.parent / f'{tmp_path.name}-two',
                         compilation_cache)
  for key in ('methods', 'base_model', 'base_recall'):
    assert two[key] == results[key], key


def test_train_lm_cms_variants_and_bad_levels_fail_early():
  from experiments.configs import train_lm as train_lm_config
  from sleep_jax import lm_trainer
  for n in (2, 3, 4):
    config = train_lm_config.get_config(f'smoke,cms{n}')
    model_config = lm_trainer.validate_config(config)
    assert len(model_config.cms_levels) == n
    assert [l.chunk_size for l in model_config.cms_levels] == [4 ** i for i in range(n)]
  config = train_lm_config.get_config('cms3')
  config.model.cms_levels[1]['chunk_size'] = 3
  with pytest.raises(ValueError, match=r'model.cms_levels\[1\].chunk_size=3'):
    lm_trainer.validate_config(config)
  proc = _run('experiments.cms_recall',
              '--config=experiments/configs/cms_recall.py:smoke',
              '--config.model.mlp=swiglu', '--workdir=/tmp/unused', check=False)
  assert proc.returncode != 0 and 'cms_levels' in proc.stderr


@pytest.mark.slow
def test_seeding_smoke_writes_results_and_bad_knobs_fail_early(
    tmp_path, compilation_cache):
  args = ['experiments.seeding',
          '--config=experiments/configs/seeding.py:smoke',
          '--config.sleep.alpha=0.5', f'--workdir={tmp_path}']
  proc = _run(*args, env=compilation_cache)
  results = json.load(open(tmp_path / 'results.json'))
  run, = results['runs']
  assert run['sleep']['alpha'] == 0.5
  assert 0 <= run['recall']['new'] <= 1 and 0 <= results['teacher']['base'] <= 1
  assert 'setting ' in proc.stdout and '% of teacher' in proc.stdout
  base, = os.listdir(tmp_path / 'base')  # kept for a re-run
  assert os.path.isdir(tmp_path / 'base' / base / 'params')
  # Run again (as after a crash): the base model is restored, not retrained,
  # and the finished run is kept, not seeded again.
  again = _run(*args, env=compilation_cache)
  assert 'reusing the base model' in again.stdout
  assert 'base step' not in again.stdout
  assert f"[{run['label']}] kept from" in again.stdout
  assert f"[{run['label']}] new " not in again.stdout
  rerun = json.load(open(tmp_path / 'results.json'))
  assert rerun['runs'] == results['runs'] and rerun['other_runs'] == []
  assert rerun['teacher'] == results['teacher']
  assert rerun['base_model'] == results['base_model']
  # Knowledge Seeding as two JAX processes: the same numbers.
  two = _on_two_processes(args, tmp_path,
                         tmp_path.parent / f'{tmp_path.name}-two',
                         compilation_cache)
  # Recall exactly; the training metrics to float tolerance (the gradient
  # sums meet across processes over gloo, in another order).
  _assert_same_numbers(two['runs'], results['runs'])
  for key in ('teacher', 'base_model'):
    assert two[key] == results[key], key
  proc = _run('experiments.seeding',
              '--config=experiments/configs/seeding.py:smoke',
              '--config.sleep.alpha=2', '--workdir=/tmp/unused', check=False)
  assert proc.returncode != 0 and 'sleep.alpha=2' in proc.stderr
  assert 'Compiling' not in proc.stderr and 'base step' not in proc.stdout


@pytest.mark.slow
def test_dreaming_smoke_writes_results_and_bad_knobs_fail_early(tmp_path):
  proc = _run('experiments.dreaming',
              '--config=experiments/configs/dreaming.py:smoke',
              '--config.dreaming.rounds=1', f'--workdir={tmp_path}')
  results = json.load(open(tmp_path / 'results.json'))
  run, = results['runs']
  assert [r['round'] for r in run['rounds']] == [0, 1]
  assert all(0 <= r['reward_fraction'] <= 1 for r in run['rounds'])
  assert 0 <= run['recall']['new'] <= 1 and 0 <= results['before']['base'] <= 1
  assert 'rewarded dreams per round' in proc.stdout
  with open(tmp_path / 'dreaming.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Run again (as after a crash): the base model is restored, not retrained,
  # and the finished run is kept, not dreamt again.
  again = _run('experiments.dreaming',
               '--config=experiments/configs/dreaming.py:smoke',
               '--config.dreaming.rounds=1', f'--workdir={tmp_path}')
  assert 'reusing the base model' in again.stdout
  assert 'base step' not in again.stdout and 'round 0:' not in again.stdout
  assert '[default] kept from' in again.stdout
  rerun = json.load(open(tmp_path / 'results.json'))
  assert rerun['runs'] == results['runs']
  assert rerun['before'] == results['before']
  proc = _run('experiments.dreaming',
              '--config=experiments/configs/dreaming.py:smoke',
              '--config.dreaming.keep_top=9', '--workdir=/tmp/unused',
              check=False)
  assert proc.returncode != 0 and 'dreaming.keep_top=9' in proc.stderr
  assert 'base step' not in proc.stdout
  # Prompts are rendered before the base model trains.
  proc = _run('experiments.dreaming',
              '--config=experiments/configs/dreaming.py:smoke',
              '--config.prompt_width=8', '--workdir=/tmp/unused', check=False)
  assert proc.returncode != 0
  assert 'prompt_width=8: a dream prompt' in proc.stderr
  assert 'base step' not in proc.stdout


def test_dreaming_study_keeps_earlier_runs_only_of_the_same_base(tmp_path):
  from experiments.configs import dreaming as dreaming_config
  from sleep_jax.studies import dreaming as dreaming_study
  from sleep_jax import metrics
  config = dreaming_config.get_config('smoke')
  path = str(tmp_path / 'results.json')
  base = {'sha256': 'ab', 'backend': 'cpu', 'matmul_precision': 'None'}
  earlier = {'config': config.to_dict(), 'before': {'new': 0.25, 'base': 0.5},
             'base_model': base, 'runs': [{'dreaming': {'rounds': 1}}],
             'other_runs': [{'dreaming': {'rounds': 2}}]}
  now = {k: earlier[k] for k in ('before', 'base_model')}
  metrics.write_json(path, earlier)
  # Other runs asked for, other dreaming defaults: every earlier run counts.
  config.runs = [dict(rounds=3)]
  config.dreaming.keep_top = 2
  assert dreaming_study._earlier_runs(path, config, now) == [
      {'dreaming': {'rounds': 1}}, {'dreaming': {'rounds': 2}}]
  # Another base model (recall before differs, or its arrays): set aside
  # whole, none kept.
  for other in (dict(now, before={'new': 0.3, 'base': 0.5}),
                dict(now, base_model=dict(base, sha256='cd'))):
    metrics.write_json(path, earlier)
    assert dreaming_study._earlier_runs(path, config, other) == []
    assert not os.path.exists(path)
  asides = [f for f in os.listdir(tmp_path) if f != 'results.json']
  assert len(asides) == 2, asides  # the same second: not overwritten
  for aside in asides:
    assert aside.startswith('results.json.earlier-')
    assert json.load(open(tmp_path / aside)) == json.loads(json.dumps(earlier))
  # Other settings apart from runs/dreaming: likewise.
  metrics.write_json(path, earlier)
  config.prompt_width = 95
  assert dreaming_study._earlier_runs(path, config, now) == []
  assert not os.path.exists(path)


@pytest.mark.parametrize('overrides, message', [
    (dict(prompt_width=150), r'prompt_width=150 \+ dreaming.max_new_tokens=28 '
                             'exceeds model.max_len=160'),
    (dict(runs=[dict(), dict(top_k=600)]),
     r'dreaming \(runs\[1\]\).top_k=600 exceeds model.vocab_size=512'),
])
def test_dreaming_study_config_checks(overrides, message):
  from experiments.configs import dreaming as dreaming_config
  from sleep_jax.studies import dreaming as dreaming_study
  config = dreaming_config.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    dreaming_study.validate_config(config)


@pytest.mark.parametrize('study', ['cms_recall', 'seeding'])
def test_study_default_configs_fit_their_world(study):
  """The no-flag run of each fact-world study must not fail on its data:
  every passage and question row fits data.seq_len (the smoke variants the
  other tests run are not the defaults users run)."""
  import importlib
  from sleep_jax.studies import fact_world
  config = importlib.import_module(f'experiments.configs.{study}').get_config()
  world = fact_world.build(config)
  for people in [world.base, *world.sessions]:
    assert world.passages(people)['inputs'].shape[1] == config.data.seq_len
    world.recall(people)
    world.probe(people)
