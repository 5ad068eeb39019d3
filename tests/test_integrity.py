"""Damaged checkpoints are detected, never restored as wrong numbers:
per-array checksums (sleep_jax.checkpoints.integrity) in the Checkpointer
and in the base-model cache (sleep_jax.studies.fact_world)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sleep_jax.checkpoints import integrity
from sleep_jax.checkpoints.manager import Checkpointer
from sleep_jax.studies import fact_world


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {'w': rng.normal(size=(64, 64)).astype(np.float32),
          'b': np.arange(5, dtype=np.int32) + seed}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory)
           for name in names]
  return max(files, key=os.path.getsize)


def _flip_bytes(directory, count=64):
  """Inverts `count` bytes in the middle of the largest file under it (the
  array data)."""
  path = _largest_file(directory)
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  assert len(data) > 4 * count, (path, len(data))
  middle = len(data) // 2
  for i in range(middle, middle + count):
    data[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _truncate(directory):
  path = _largest_file(directory)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


# integrity.checksums / verify


def test_verify_names_the_changed_array():
  """Any change of a value is caught and the array is named."""
  tree = {'a': _tree(0), 'c': np.zeros(3, np.float32)}
  sums = integrity.checksums(tree)
  assert sorted(sums) == ["['a']['b']", "['a']['w']", "['c']"]
  integrity.verify(tree, sums, 'ckpt/7')
  changed = jax.tree.map(np.copy, tree)
  changed['a']['w'][10, 3] = np.nextafter(changed['a']['w'][10, 3], np.inf)
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r"ckpt/7: array \['a'\]\['w'\]"):
    integrity.verify(changed, sums, 'ckpt/7')


def test_checksums_see_dtype_and_shape():
  """Same bytes with another dtype or shape are not the same array."""
  x = np.arange(6, dtype=np.int32)
  base = integrity.checksums({'x': x})
  assert integrity.checksums({'x': x.view(np.float32)}) != base
  assert integrity.checksums({'x': x.reshape(2, 3)}) != base
  assert integrity.checksums({'x': x.copy()}) == base


def test_verify_refuses_missing_or_extra_arrays_and_skips_without_sums():
  """A tree with other arrays than the checksums list is refused; no
  checksums (an older checkpoint) means nothing to compare."""
  tree = _tree(0)
  sums = integrity.checksums(tree)
  with pytest.raises(integrity.CorruptCheckpointError, match=r"\['b'\]"):
    integrity.verify({'w': tree['w']}, sums, 'x')
  with pytest.raises(integrity.CorruptCheckpointError, match=r"\['extra'\]"):
    integrity.verify({**tree, 'extra': np.ones(1)}, sums, 'x')
  integrity.verify({'anything': np.ones(2)}, None, 'x')


# Checkpointer


@pytest.fixture
def two_steps(tmp_path):
  """A Checkpointer directory with steps 0 and 1 of different trees."""
  directory = str(tmp_path / 'checkpoints')
  checkpointer = Checkpointer(directory)
  for step in (0, 1):
    checkpointer.save(step, _tree(step), metadata={'note': f'n{step}'})
  checkpointer.wait()
  checkpointer.close()
  return directory


def _restore(directory, step):
  checkpointer = Checkpointer(directory)
  try:
    return checkpointer.restore(step, _abstract(_tree(step)))
  finally:
    checkpointer.close()


def test_checkpointer_round_trip(two_steps):
  """What was saved comes back, with its metadata but not the checksums."""
  for step in (0, 1):
    state, metadata = _restore(two_steps, step)
    assert _equal(state, _tree(step))
    assert metadata == {'note': f'n{step}', 'step': step}


def test_flipped_bytes_never_restore_wrong_numbers(two_steps):
  """Orbax decodes damaged bytes into wrong numbers without an error; the
  checksums turn that into an error naming the step. Step 0 is untouched."""
  _flip_bytes(os.path.join(two_steps, '1', 'state'))
  try:
    state, _ = _restore(two_steps, 1)
  except integrity.CorruptCheckpointError as e:
    assert os.path.join(two_steps, '1') in str(e)
  except Exception:  # pylint: disable=broad-except
    pass  # Orbax could not decode it: loud, which is all that matters.
  else:
    assert _equal(state, _tree(1)), 'damaged bytes restored as other numbers'
  state, _ = _restore(two_steps, 0)
  assert _equal(state, _tree(0))


def test_truncated_checkpoint_raises(two_steps):
  """A file cut short (a full disk, a killed copy) is an error, not zeros."""
  _truncate(os.path.join(two_steps, '1', 'state'))
  with pytest.raises(Exception):
    _restore(two_steps, 1)
  state, _ = _restore(two_steps, 0)
  assert _equal(state, _tree(0))


def test_restore_newest_falls_back_past_damaged_and_rejected_steps(two_steps):
  """What train_lm and the main job resume from: the newest step that is
  whole and passes the caller's check; the others are moved aside (kept,
  never tried again), each reported with its path."""
  _flip_bytes(os.path.join(two_steps, '1', 'state'))
  lines = []
  checkpointer = Checkpointer(two_steps)
  try:
    step, state, metadata = checkpointer.restore_newest(
        _abstract(_tree(0)), log=lines.append)
  finally:
    checkpointer.close()
  assert step == 0 and _equal(state, _tree(0)) and metadata['note'] == 'n0'
  assert len(lines) == 1 and os.path.join(two_steps, '1') in lines[0]
  assert glob.glob(f'{two_steps}.bad-step1-*')
  assert sorted(os.listdir(two_steps)) == ['0']

  def reject(step, state, metadata):
    raise ValueError(f'not this run ({step})')
  checkpointer = Checkpointer(two_steps)
  try:
    assert checkpointer.restore_newest(_abstract(_tree(0)), check=reject,
                                       log=lines.append) is None
  finally:
    checkpointer.close()
  assert 'not this run (0)' in lines[-1] and not os.listdir(two_steps)


# fact_world.restore_or_train / checked_file


class _Trainer:
  """train() for restore_or_train that counts its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self):
    self.calls += 1
    return {'w': _tree(0)['w']}, {'count': np.arange(3, dtype=np.int32)}


def test_restore_or_train_trains_once_then_restores(tmp_path):
  """The second call reuses the saved model; both return the same arrays."""
  directory = str(tmp_path / 'base')
  train, logs = _Trainer(), []
  first = fact_world.restore_or_train(directory, train, logs.append)
  assert train.calls == 1
  with open(os.path.join(directory, 'checksums.json')) as f:
    assert set(json.load(f)['arrays']) == {"['model_state']['count']",
                                           "['params']['w']"}
  second = fact_world.restore_or_train(directory, train, logs.append)
  assert train.calls == 1
  assert _equal(second, first)
  assert any('reusing' in line for line in logs)


def test_restore_or_train_retrains_a_damaged_model(tmp_path):
  """Flipped bytes in the saved model: it is moved aside (kept for a look)
  and trained again, never returned damaged; the new one is then reused."""
  directory = str(tmp_path / 'base')
  train, logs = _Trainer(), []
  first = fact_world.restore_or_train(directory, train, logs.append)
  _flip_bytes(os.path.join(directory, 'params'))
  third = fact_world.restore_or_train(directory, train, logs.append)
  assert train.calls == 2
  assert _equal(third, first)
  assert any('damaged' in line for line in logs), logs
  assert len(glob.glob(os.path.join(directory, 'params.bad-*'))) == 1
  fact_world.restore_or_train(directory, train, logs.append)
  assert train.calls == 2


def test_restore_or_train_retrains_a_deleted_model(tmp_path):
  """No saved model (deleted by hand): trained again."""
  directory = str(tmp_path / 'base')
  train = _Trainer()
  first = fact_world.restore_or_train(directory, train, lambda _: None)
  shutil.rmtree(os.path.join(directory, 'params'))
  again = fact_world.restore_or_train(directory, train, lambda _: None)
  assert train.calls == 2
  assert _equal(again, first)


def test_record_file_keeps_the_array_checksums(tmp_path):
  """Recording the tokenizer's checksum does not drop the model's, so the
  model is still reused afterwards."""
  directory = str(tmp_path / 'base')
  train = _Trainer()
  fact_world.restore_or_train(directory, train, lambda _: None)
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(b'tokens')
  fact_world.record_file(directory, 'tokenizer.model')
  with open(os.path.join(directory, 'checksums.json')) as f:
    recorded = json.load(f)
  assert set(recorded) == {'arrays', 'files'}
  fact_world.restore_or_train(directory, train, lambda _: None)
  assert train.calls == 1


def test_checked_file(tmp_path):
  """Missing: False. Unrecorded (an older cache): True, and recorded now.
  Recorded then damaged: False, and the whole directory (the model trained
  with that file) is moved aside and recreated empty."""
  directory = tmp_path / 'base'
  directory.mkdir()
  logs = []
  assert not fact_world.checked_file(str(directory), 'tokenizer.model',
                                     logs.append)
  assert os.listdir(directory) == []

  (directory / 'tokenizer.model').write_bytes(b'0123456789' * 10)
  assert fact_world.checked_file(str(directory), 'tokenizer.model', logs.append)
  with open(directory / 'checksums.json') as f:
    assert 'tokenizer.model' in json.load(f)['files']
  assert fact_world.checked_file(str(directory), 'tokenizer.model', logs.append)
  assert not glob.glob(f'{directory}.bad-*')

  with open(directory / 'tokenizer.model', 'r+b') as f:
    f.truncate(50)
  assert not fact_world.checked_file(str(directory), 'tokenizer.model',
                                     logs.append)
  aside = glob.glob(f'{directory}.bad-*')
  assert len(aside) == 1
  assert os.path.getsize(os.path.join(aside[0], 'tokenizer.model')) == 50
  assert directory.is_dir() and os.listdir(directory) == []
  assert any('damaged' in line for line in logs), logs


def test_a_damaged_checksum_record_is_damage_too(tmp_path):
  """A checksums.json that does not read back cannot vouch for the arrays
  (they may be damaged as well): the model is retrained, never re-blessed;
  checked_file moves the whole cache aside."""
  directory = str(tmp_path / 'base')
  train = _Trainer()
  first = fact_world.restore_or_train(directory, train, lambda _: None)
  _flip_bytes(os.path.join(directory, 'params'))
  with open(os.path.join(directory, 'checksums.json'), 'w') as f:
    f.write('{"files": {')
  lines = []
  again = fact_world.restore_or_train(directory, train, lines.append)
  assert train.calls == 2 and _equal(again, first)
  assert 'checksums.json does not read back' in lines[0]
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(b'tokens')
  fact_world.record_file(directory, 'tokenizer.model')
  with open(os.path.join(directory, 'checksums.json'), 'w') as f:
    f.write('[')
  assert not fact_world.checked_file(directory, 'tokenizer.model',
                                     lines.append)
  assert glob.glob(f'{directory}.bad-*') and not os.listdir(directory)
