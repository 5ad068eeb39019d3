"""Growing and resetting expert slots, and their trainable masks
(sleep_jax.growth)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax import growth
from sleep_jax.models import variables
from cms_setup import LEVELS, fill_slots, loss, make


@pytest.mark.parametrize('gate_bias', [0.0, -4.0])
def test_growth_is_bit_identical_and_the_expert_is_live(gate_bias):
  model, params, state, tokens = make(
      [dict(level, gate_bias=gate_bias) for level in LEVELS])
  forward = jax.jit(lambda v, t: model.apply(v, t))
  logits = forward(variables(params, state), tokens)
  # Grow into both levels, up to their top-k budgets (3 and 2 experts).
  for level, slots in ((0, 3), (1, 2)):
    for want_slot in range(slots):
      params, state, slot = growth.grow(params, state, level,
                                        jax.random.key(10 + want_slot))
      assert slot == want_slot
      grown = forward(variables(params, state), tokens)
      np.testing.assert_array_equal(np.asarray(grown), np.asarray(logits))
  a = params['layers_0']['mlp']['level_0']['lowrank_a']
  assert np.all(np.asarray(jnp.std(a, axis=(1, 2))) > 0.05)  # A is random
  # The same expert with B != 0 changes the output: the bit-identity above
  # comes from B = 0, not from the expert being ignored.
  b_path = params['layers_1']['mlp']['level_0']
  b_path['lowrank_b'] = b_path['lowrank_b'].at[2].set(0.5)
  changed = forward(variables(params, state), tokens)
  assert float(jnp.max(jnp.abs(changed - logits))) > 1e-3


def test_growth_past_e_max_names_level_and_key():
  model, params, state, _ = make(LEVELS)
  for _ in range(2):
    params, state, _ = growth.grow(params, state, 1, jax.random.key(0))
  with pytest.raises(ValueError) as err:
    growth.grow(params, state, 1, jax.random.key(0))
  msg = str(err.value)
  assert 'level 1' in msg and 'E_max=2' in msg
  assert 'model.cms_levels[1].num_experts' in msg


def test_reset_frees_slots_for_the_next_grow():
  model, params, state, tokens = make(LEVELS)
  for _ in range(3):
    params, state, _ = growth.grow(params, state, 0, jax.random.key(1))
  params = fill_slots(params, 0, 3)
  params, state = growth.reset(params, state, 0, [0, 2])
  assert growth.active_slots(state, 0) == [1]
  level = params['layers_1']['mlp']['level_0']
  for slot in (0, 2):
    assert not np.any(np.asarray(level['lowrank_a'][slot]))
    assert not np.any(np.asarray(level['lowrank_b'][slot]))
    assert not np.any(np.asarray(level['router'][:, slot]))
  assert np.any(np.asarray(level['lowrank_b'][1]))  # untouched
  params, state, slot = growth.grow(params, state, 0, jax.random.key(2))
  assert slot == 0
  params, state, slot = growth.grow(params, state, 0, jax.random.key(2))
  assert slot == 2
  with pytest.raises(ValueError, match='out of range'):
    growth.reset(params, state, 0, [3])


def test_masked_optimizer_changes_only_the_unlocked_slot():
  model, params, state, tokens = make(LEVELS)
  for _ in range(2):
    params, state, _ = growth.grow(params, state, 1, jax.random.key(4))
  params = fill_slots(params, 1, 2)
  mask = growth.expert_mask(params, 1, jnp.array([False, True]))
  tx = growth.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
  opt_state = tx.init(params)
  trained_leaves = len(jax.tree.leaves(opt_state))
  assert trained_leaves < len(jax.tree.leaves(params))  # frozen: no moments

  @jax.jit
  def step(params, opt_state, mask):
    grads = jax.grad(loss, argnums=1)(model, params, state, tokens)
    grads = growth.mask_tree(grads, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return growth.apply_masked_updates(params, updates, mask), opt_state

  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state, mask)
  flat_old = jax.tree_util.tree_leaves_with_path(params)
  flat_new = jax.tree.leaves(new)
  for (path, old), fresh in zip(flat_old, flat_new):
    name = growth._level_leaf(path, 1)
    old, fresh = np.asarray(old), np.asarray(fresh)
    if name in ('lowrank_a', 'lowrank_b'):
      assert np.array_equal(old[0], fresh[0]) and not np.array_equal(old[1], fresh[1])
    elif name == 'router':
      assert np.array_equal(old[:, 0], fresh[:, 0])
      assert not np.array_equal(old[:, 1], fresh[:, 1])
    else:
      assert np.array_equal(old, fresh), jax.tree_util.keystr(path)


def test_forward_and_train_step_compile_once_across_grows(compile_counter):
  import functools
  from sleep_jax import sharding, training
  model, _, _, tokens = make(LEVELS)
  tx = optax.adamw(1e-3)
  mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  state, shardings = sharding.init_sharded(
      functools.partial(training.create_train_state, model, tx), mesh, rules,
      jax.random.key(0), tokens)
  step = training.compile_train_step(model, tx, lambda s: 1e-3, shardings,
                                     mesh, rules)
  forward = jax.jit(lambda v, t: model.apply(v, t))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'mask': jnp.ones((2, 9), jnp.float32)}
  state, _ = step(state, batch)
  forward(variables(state.params, state.model_state), tokens)
  for level in (0, 1):  # growth's own small programs compile once per level
    p, s, _ = growth.grow(state.params, state.model_state, level,
                          jax.random.key(0))
    growth.reset(p, s, level, [0])
  with compile_counter() as compiles:
    for t in range(6):
      params, model_state = state.params, state.model_state
      level = t % 2
      if growth.active_slots(model_state, level) and t % 3 == 2:
        params, model_state = growth.reset(
            params, model_state, level, growth.active_slots(model_state, level))
      else:
        params, model_state, _ = growth.grow(params, model_state, level,
                                             jax.random.key(t))
      state = state.replace(params=params, model_state=model_state)
      state, metrics = step(state, batch)
      forward(variables(state.params, state.model_state), tokens)
    jax.block_until_ready(metrics)
  assert compiles() == 0
  assert step.jitted._cache_size() == 1 and forward._cache_size() == 1
