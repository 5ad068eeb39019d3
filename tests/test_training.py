"""Loss, the trainer loop, exact resume, NaN errors, early config checks and
which earlier results a re-run keeps."""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import train_lm as train_lm_config
from sleep_jax import lm_trainer, metrics, training
from sleep_jax.studies import results as results_lib


def test_next_token_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = -(picked * mask).sum() / mask.sum()
  loss, tokens = training.next_token_loss(logits, targets, mask)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(tokens) == 7
  # Masked positions have no effect.
  logits2 = logits.copy()
  logits2[0, 2] += 100.0
  assert float(training.next_token_loss(logits2, targets, mask)[0]) == pytest.approx(
      expected, rel=1e-5)


def test_optimizer_schedule_and_weight_decay_mask():
  tx, schedule = training.make_optimizer(train_lm_config.get_config().optimizer, 600)
  assert float(schedule(0)) == 0.0
  assert float(schedule(50)) == pytest.approx(3e-3)
  assert float(schedule(600)) == pytest.approx(3e-4)
  params = {'w': np.ones((2, 2), np.float32), 'scale': np.ones((2,), np.float32),
            'q_bias': np.ones((2, 2), np.float32)}
  zero = jax.tree.map(np.zeros_like, params)
  state = tx.init(params)
  for _ in range(60):  # past warmup; zero grads -> only weight decay moves
    updates, state = tx.update(zero, state, params)
  assert np.all(np.asarray(updates['w']) < 0)
  assert np.all(np.asarray(updates['scale']) == 0)
  assert np.all(np.asarray(updates['q_bias']) == 0)


def _smoke_config(**overrides):
  config = train_lm_config.get_config('smoke')
  config.data.num_documents = 400
  config.num_train_steps = 6
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.sample_tokens = 4
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _final_state(workdir, config):
  """Restores the latest checkpoint's params with plain numpy arrays."""
  path = os.path.join(workdir, 'checkpoints')
  mngr = ocp.CheckpointManager(path, item_names=('state', 'metadata'))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
  mngr.close()
  return step, restored['state'], restored['metadata']


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows}


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  config = _smoke_config()
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  lm_trainer.train(config, straight)
  first = lm_trainer.train(config, resumed, stop_after=3)
  assert first['step'] == 3
  second = lm_trainer.train(config, resumed)
  assert second['step'] == 6

  a_step, a_state, meta = _final_state(straight, config)
  b_step, b_state, _ = _final_state(resumed, config)
  assert a_step == b_step == 6
  leaves_a = jax.tree.leaves(a_state)
  leaves_b = jax.tree.leaves(b_state)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  losses_a, losses_b = _losses(straight), _losses(resumed)
  with open(os.path.join(resumed, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated rows after the resume
  for step in (4, 5, 6):  # steps run only after the resume
    assert losses_a[step] == losses_b[step]
  assert meta['config']['model']['d_model'] == config.model.d_model
  # The data iterator state was restored: without it step 4 would re-read
  # the first batch and its loss would differ from the straight run.
  assert losses_a[4] != losses_a[1]


@pytest.mark.slow
def test_outputs_in_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  result = lm_trainer.train(_smoke_config(**{'data.source': 'memory'}), workdir)
  names = set(os.listdir(workdir))
  assert {'config.json', 'metrics.jsonl', 'tensorboard', 'checkpoints',
          'tokenizer.model', 'final_metrics.json'} <= names
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert losses[6] < losses[1]
  assert np.isfinite(result['eval_loss'])
  assert result['sample'].startswith('Ada lives in')


def test_divergence_names_the_step_and_metric(tmp_path):
  config = _smoke_config(**{'optimizer.learning_rate': 1e30,
                            'optimizer.warmup_steps': 0,
                            'optimizer.grad_clip': 1e30})
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match=r"at step \d+: metric '(loss|grad_norm)'"):
    lm_trainer.train(config, workdir)
  # No checkpoint holds non-finite params (it would be resumed from).
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for step in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=('state',))
    state = mngr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
    mngr.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_check_finite_names_metric():
  with pytest.raises(FloatingPointError, match="step 7: metric 'grad_norm' is inf"):
    metrics.check_finite(7, {'loss': 1.0, 'grad_norm': float('inf')})


def test_earlier_results_kept_only_for_the_same_settings(tmp_path):
  config = ml_collections.ConfigDict(dict(seed=0, widths=(8, 16), runs=[]))
  earlier = {'config': config.to_dict(), 'before': {'new': 0.25},
             'runs': [{'a': 1}]}
  as_json = json.loads(json.dumps(earlier))  # (8, 16) -> [8, 16]
  assert results_lib.earlier_results(str(tmp_path / 'none.json'), config, (),
                                 {}) is None
  # The runs asked for differ, but they are ignored: kept, the file stays.
  config.runs = [{'a': 2}]
  path = str(tmp_path / 'results.json')
  metrics.write_json(path, earlier)
  assert results_lib.earlier_results(path, config, ('runs',),
                                 {'before': {'new': 0.25}}) == as_json
  assert os.listdir(tmp_path) == ['results.json']
  # Another setting, or another value measured before the runs: set aside
  # whole, not kept.
  for i, (changes, same) in enumerate([(dict(seed=1), {'new': 0.25}),
                                       (dict(widths=(8,)), {'new': 0.25}),
                                       ({}, {'new': 0.5})]):
    os.makedirs(tmp_path / str(i))
    path = str(tmp_path / str(i) / 'results.json')
    metrics.write_json(path, earlier)
    changed = ml_collections.ConfigDict(dict(config.to_dict(), **changes))
    assert results_lib.earlier_results(path, changed, ('runs',),
                                   {'before': same}) is None
    aside, = os.listdir(tmp_path / str(i))
    assert aside.startswith('results.json.earlier-')
    assert json.load(open(tmp_path / str(i) / aside)) == as_json


def test_kept_run_matches_settings_as_json_reads_them_back():
  done = [{'sleep': {'alpha': 0.5, 'widths': [8, 16]}, 'recall': 0.7},
          {'sleep': {'alpha': 1.0, 'widths': [8]}, 'recall': 0.9}]
  assert results_lib.kept_run(done, 'sleep', {'alpha': 1.0, 'widths': (8,)}) is (
      done[1])
  assert results_lib.kept_run(done, 'sleep', {'alpha': 1.0, 'widths': (16,)}) is None
  asked = [{'sleep': {'alpha': 0.5, 'widths': [8, 16]}, 'recall': 0.1}]
  assert results_lib.runs_not_asked(done, asked, 'sleep') == [done[1]]
  assert results_lib.runs_not_asked(done, [], 'sleep') == done


def test_base_fingerprint_survives_a_checkpoint_and_sees_any_change(tmp_path):
  from sleep_jax.studies import fact_world
  params = {'dense': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  state = {'counts': np.zeros((4,), np.int32)}
  trained = fact_world.restore_or_train(str(tmp_path), lambda: (params, state))
  restored = fact_world.restore_or_train(
      str(tmp_path), lambda: pytest.fail('retrained instead of restored'))
  mark = results_lib.fingerprint(*trained)
  assert results_lib.fingerprint(*restored) == mark
  assert mark['backend'] == jax.default_backend()
  changed = {'dense': {'kernel': params['dense']['kernel'].copy()}}
  changed['dense']['kernel'][1, 2] += 1e-6
  assert results_lib.fingerprint(changed, state)['sha256'] != mark['sha256']
  renamed = {'dense': {'bias': params['dense']['kernel']}}
  assert results_lib.fingerprint(renamed, state)['sha256'] != mark['sha256']


@pytest.mark.parametrize('overrides, message', [
    ({'model.num_heads': 3}, 'num_heads=3 must be a multiple of num_kv_heads=2'),
    ({'model.d_model': 60, 'model.num_kv_heads': 1, 'model.num_heads': 8},
     'd_model=60 is not divisible by num_heads=8'),
    ({'mesh.data': 3}, 'needs 3 devices but 8 are available'),
    ({'data.source': 'tfrecord'}, "data.source='tfrecord'"),
    ({'optimizer.warmup_steps': 100}, 'optimizer.warmup_steps=100'),
    ({'data.batch_size': 6}, 'data.batch_size=6 must be divisible'),
    ({'mesh.data': 2, 'mesh.tensor': 4},
     r"kv_heads=2, which does not split over mesh axes \['tensor'\]"),
])
def test_invalid_config_fails_before_compiling(tmp_path, compile_counter,
                                               overrides, message):
  config = _smoke_config(**overrides)
  with compile_counter() as compiles:
    with pytest.raises(ValueError, match=message):
      lm_trainer.train(config, str(tmp_path / 'bad'))
  assert compiles() == 0
  assert not os.path.exists(tmp_path / 'bad')


# training.divergence: V = 512, so ln V = 6.24.


@pytest.mark.parametrize('bad, shown', [(np.nan, 'nan'), (np.inf, 'inf'),
                                        (-np.inf, '-inf')])
def test_divergence_names_the_first_non_finite_step(bad, shown):
  """A NaN or inf loss anywhere is divergence, named by its (1-based) step,
  even before the loss ever went below ln V."""
  losses = [7.0, 7.0, 5.0, bad, 5.0, np.nan]
  assert training.divergence(losses, 512, patience=10) == (
      f'the loss is {shown} at step 4')
  assert 'step 1' in training.divergence([bad], 512, patience=10)


def test_divergence_after_learning_then_noise_for_patience_steps():
  """A model that was learning (below ln V) and then sits at or above it for
  `patience` steps in a row has diverged; the message says up to which
  step."""
  uniform = float(np.log(512))
  losses = [7.0, 6.0, 5.0, 7.0, uniform, 8.0, 5.0]
  message = training.divergence(losses, 512, patience=3)
  assert message is not None
  assert 'for 3 steps, up to step 6' in message and 'ln V = 6.24' in message
  assert training.divergence(losses, 512, patience=4) is None


def test_untrained_model_is_not_diverged():
  """A loss above ln V from the start (a model still at its random init)
  never went below it: not divergence, however long."""
  assert training.divergence([7.0] * 100, 512, patience=3) is None


def test_spikes_shorter_than_patience_are_not_divergence():
  """Brief spikes above ln V between learning steps are tolerated."""
  losses = [5.0, 7.0, 7.0, 5.0, 7.0, 7.0, 5.0, 7.0, 7.0]
  assert training.divergence(losses, 512, patience=3) is None
  assert training.divergence(losses, 512, patience=2) is not None
