"""Meshes, born-sharded init and the sharded train step on 8 fake devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import sharding, training
from sleep_jax.models import Transformer
from tiny_models import tiny_config

CONFIG = tiny_config(vocab_size=64, d_model=64, num_kv_heads=4, d_ff=128)
OPT = dict(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9,
           b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize('shape, expected', [
    ({'data': -1}, (8, 1, 1)),
    ({'data': 2, 'tensor': 4}, (2, 1, 4)),
    ({'data': 2, 'fsdp': -1, 'tensor': 2}, (2, 2, 2)),
])
def test_mesh_shape_fills_minus_one(shape, expected):
  assert sharding.resolve_mesh_shape(shape, 8) == expected
  assert tuple(sharding.make_mesh(shape).shape.values()) == expected


@pytest.mark.parametrize('shape, message', [
    ({'data': 3, 'tensor': 2}, 'needs 6 devices but 8 are available'),
    ({'data': -1, 'tensor': 3}, 'does not divide 8'),
    ({'data': -1, 'fsdp': -1}, 'only one axis may be -1'),
    ({'model': 8}, "unknown axes ['model']"),
])
def test_bad_mesh_is_a_clear_error(shape, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    sharding.make_mesh(shape)


def _train(mesh, batches, steps=3):
  model = Transformer(CONFIG)
  tx, schedule = training.make_optimizer(OPT, 10)
  rules = sharding.DEFAULT_RULES
  state, shardings = sharding.init_sharded(
      functools.partial(training.create_train_state, model, tx), mesh, rules,
      jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  step = training.compile_train_step(model, tx, schedule, shardings, mesh, rules)
  losses = []
  for batch in batches[:steps]:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses, step


def _batches(n=3):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    toks = rng.integers(0, 64, (8, 17)).astype(np.int32)
    mask = np.ones((8, 16), np.int32)
    mask[:, 12:] = 0
    out.append({'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'mask': mask})
  return out


def test_2x4_mesh_train_step_matches_single_device_and_is_sharded():
  batches = _batches()
  mesh8 = sharding.make_mesh({'data': 2, 'tensor': 4})
  mesh1 = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  state8, losses8, _ = _train(mesh8, batches)
  state1, losses1, _ = _train(mesh1, batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  flat8 = jax.tree_util.tree_leaves_with_path(state8.params)
  flat1 = jax.tree.leaves(state1.params)
  for (path, a), b in zip(flat8, flat1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The params really are split: the MLP hidden dim over 'tensor' (4 ways).
  gate = state8.params['layers_0']['mlp']['gate_kernel']
  assert gate.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert gate.addressable_shards[0].data.shape == (64, 32)
  embed = state8.params['embed']['embedding']
  assert embed.addressable_shards[0].data.shape == (16, 64)
  q = state8.params['layers_0']['attn']['q_kernel']
  assert q.addressable_shards[0].data.shape == (64, 1, 16)
  # Optimizer moments follow their params.
  mu = state8.opt_state[1][0].mu['layers_0']['mlp']['gate_kernel']
  assert mu.sharding == gate.sharding
  assert len({s.device for s in gate.addressable_shards}) == 8


def test_train_step_compiles_once(compile_counter):
  batches = _batches(4)
  mesh = sharding.make_mesh({'data': 2, 'tensor': 4})
  state, _, step = _train(mesh, batches, steps=1)
  with compile_counter() as compiles:
    for batch in batches[1:]:
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  assert step.jitted._cache_size() == 1
  assert compiles() == 0


def test_rules_reject_unknown_mesh_axes():
  with pytest.raises(ValueError, match="'model' is not a mesh axis"):
    sharding.rules_from_config([['mlp', 'model']])
