"""Wake: the multi-frequency online CMS update (docs/design.md §2)."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax import growth
from sleep_jax import sharding
from sleep_jax import wake
from sleep_jax.models import variables
from tiny_models import tiny_cms_model, tiny_config

RULES = sharding.DEFAULT_RULES
CHUNKS = (1, 2, 4)
LR = (0.05, 0.03, 0.02)


def make(levels, num_kv_heads=2):
  return tiny_cms_model(vocab_size=64, num_kv_heads=num_kv_heads,
                        cms_levels=levels)


def sgd_levels(**extra):
  return [dict(chunk_size=c, width=16, num_experts=2, rank=4, top_k=3,
               optimizer='sgd', learning_rate=lr, **extra)
          for c, lr in zip(CHUNKS, LR)]


def batches(n, seed=0, batch=4, length=8):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    toks = rng.integers(0, 50, (batch, length + 1)).astype(np.int32)
    out.append({'inputs': jnp.asarray(toks[:, :-1]),
                'targets': jnp.asarray(toks[:, 1:]),
                'mask': jnp.ones((batch, length), jnp.float32)})
  return out


def grown(model, params, state):
  """One active expert per level, with B != 0 so experts matter."""
  for level in range(3):
    params, state, _ = growth.grow(params, state, level, jax.random.key(level))
  flat = traverse_util.flatten_dict(params, sep='/')
  for path in flat:
    if path.endswith('lowrank_b'):
      flat[path] = flat[path].at[0].set(0.1)
  return traverse_util.unflatten_dict(flat, sep='/'), state


def one_device_step(model):
  mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  shardings = wake.wake_state_shardings(model, mesh, RULES,
                                        jnp.zeros((4, 8), jnp.int32))
  return wake.compile_wake_step(model, shardings, mesh, RULES), shardings


def start(model, params, state, shardings):
  """A placed wake state on copies (the compiled step donates its input)."""
  params, state = jax.tree.map(jnp.copy, (params, state))
  return jax.device_put(wake.init_wake_state(model.config, params, state),
                        shardings)


def _level_of(path):
  for part in path.split('/'):
    if part.startswith('level_'):
      return int(part.split('_')[1])
  return None


def reference_loop(model, params, state, stream, boundaries):
  """Naive per-step SGD with per-level accumulation (docs/design.md §2).

  Only active experts (slot 0 here) and dense experts learn; inactive slots
  and everything outside the CMS levels stay fixed.
  """
  def loss(p, b):
    logits = model.apply(variables(p, state), b['inputs'])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
    return jnp.sum(xent * b['mask']) / jnp.sum(b['mask'])

  grad_fn = jax.jit(jax.grad(loss))  # compiled once: the 22 steps share it
  flat = {k: np.asarray(v, np.float64)
          for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  pending = {k: np.zeros_like(v) for k, v in flat.items()}
  phase, history = 0, []
  for batch, boundary in zip(stream, boundaries):
    current = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep='/')
    grads = traverse_util.flatten_dict(grad_fn(current, batch), sep='/')
    phase += 1
    for k, g in grads.items():
      level = _level_of(k)
      if level is None:
        continue
      g = np.asarray(g, np.float64).copy()
      if k.endswith('lowrank_a') or k.endswith('lowrank_b'):
        g[1:] = 0.0
      elif k.endswith('router'):
        g[:, 1:] = 0.0
      pending[k] += LR[level] * g
    for k in flat:
      level = _level_of(k)
      if level is not None and (phase % CHUNKS[level] == 0 or boundary):
        flat[k] = flat[k] - pending[k]
        pending[k] = np.zeros_like(pending[k])
    if boundary:
      phase = 0
    history.append(dict(flat))
  return history


def test_cadence_matches_naive_sgd_reference_and_flushes_at_boundary():
  model, params, state = make(sgd_levels())
  params, state = grown(model, params, state)
  # 4 * C^(2) = 16 steps (C = 1, 2, 4), then a short session of 6 steps
  # that ends mid-chunk for the two slow levels and is flushed.
  steps = 4 * CHUNKS[2]
  stream = batches(steps + 6)
  boundaries = [False] * (steps - 1) + [True] + [False] * 5 + [True]
  step, shardings = one_device_step(model)
  ws = start(model, params, state, shardings)
  snapshots, updated = [], []
  for batch, boundary in zip(stream, boundaries):
    ws, metrics = step(ws, batch, boundary)
    snapshots.append(traverse_util.flatten_dict(
        jax.device_get(ws.params), sep='/'))
    updated.append(np.asarray(metrics['updated_levels']).tolist())
  want = reference_loop(model, params, state, stream, boundaries)

  initial = traverse_util.flatten_dict(params, sep='/')
  previous = initial
  for t, snap in enumerate(snapshots):
    phase = t + 1 if t < steps else t + 1 - steps
    for level, chunk in enumerate(CHUNKS):
      due = phase % chunk == 0 or boundaries[t]
      assert updated[t][level] == int(due), (t, level)
      keys = [k for k in snap if _level_of(k) == level]
      moved = any(not np.array_equal(snap[k], previous[k]) for k in keys)
      assert moved == due, (t, level)
    for k in snap:
      if _level_of(k) is None:  # attention, embeddings, norms: frozen
        np.testing.assert_array_equal(snap[k], initial[k])
      elif k.endswith('lowrank_b') or k.endswith('lowrank_a'):
        np.testing.assert_array_equal(snap[k][1:], initial[k][1:])
      np.testing.assert_allclose(snap[k], want[t][k], atol=1e-6, rtol=0)
    previous = snap
  assert int(ws.phase) == 0 and int(ws.step) == steps + 6


def test_wake_compiles_once_across_schedule_grows_and_resets(compile_counter):
  levels = [dict(lvl, optimizer='adam') for lvl in sgd_levels()]
  model, params, state = make(levels)
  step, shardings = one_device_step(model)
  ws = start(model, params, state, shardings)
  stream = batches(10)
  ws, _ = step(ws, stream[0], False)  # compiles here
  # Warm growth/reset's own (small) programs so only wake steps are counted.
  p, s, _ = growth.grow(ws.params, ws.model_state, 0, jax.random.key(0))
  growth.reset(p, s, 0, [0])
  with compile_counter() as compiles:
    for t, batch in enumerate(stream[1:]):
      params, model_state = ws.params, ws.model_state
      if t % 3 == 0:
        params, model_state, _ = growth.grow(params, model_state, 0,
                                             jax.random.key(t))
      if t % 4 == 3:
        params, model_state = growth.reset(params, model_state, 0,
                                           growth.active_slots(model_state, 0))
      ws = ws.replace(params=jax.device_put(params, shardings.params),
                      model_state=jax.device_put(model_state,
                                                 shardings.model_state))
      ws, _ = step(ws, batch, t % 5 == 4)
    jax.block_until_ready(ws)
  assert compiles() == 0
  assert step.jitted._cache_size() == 1


def test_inactive_experts_get_zero_update_and_zero_moments():
  levels = [dict(lvl, optimizer='adamw') for lvl in sgd_levels()]
  model, params, state = make(levels)
  params, state = grown(model, params, state)
  # Junk in the inactive slot 1: weight decay would move it if not masked.
  flat = traverse_util.flatten_dict(params, sep='/')
  for k in flat:
    if k.endswith('lowrank_a') or k.endswith('lowrank_b'):
      flat[k] = flat[k].at[1].set(0.7)
    if k.endswith('router'):
      flat[k] = flat[k].at[:, 1].set(0.7)
  params = traverse_util.unflatten_dict(flat, sep='/')
  step, shardings = one_device_step(model)
  ws = start(model, params, state, shardings)
  for batch in batches(4):
    ws, _ = step(ws, batch, False)
  after = traverse_util.flatten_dict(jax.device_get(ws.params), sep='/')
  for k in after:
    if k.endswith('lowrank_a') or k.endswith('lowrank_b'):
      np.testing.assert_array_equal(after[k][1], flat[k][1])
      assert not np.array_equal(after[k][0], flat[k][0]), k
    if k.endswith('router'):
      np.testing.assert_array_equal(after[k][:, 1], flat[k][:, 1])
  moments = jax.tree_util.tree_leaves_with_path(ws.opt_states)
  for path, leaf in moments:
    keys = jax.tree_util.keystr(path)
    if 'lowrank_b' in keys:
      assert not np.any(np.asarray(leaf[1])), keys


def test_update_dense_false_trains_only_experts():
  model, params, state = make(sgd_levels(update_dense=False))
  params, state = grown(model, params, state)
  step, shardings = one_device_step(model)
  ws = start(model, params, state, shardings)
  for batch in batches(4):
    ws, _ = step(ws, batch, False)
  dense = ws.params['layers_0']['mlp']['level_0']['dense']['gate_kernel']
  np.testing.assert_array_equal(
      np.asarray(dense),
      np.asarray(params['layers_0']['mlp']['level_0']['dense']['gate_kernel']))
  b = ws.params['layers_0']['mlp']['level_0']['lowrank_b']
  assert not np.array_equal(np.asarray(b[0]),
                            np.asarray(params['layers_0']['mlp']['level_0'][
                                'lowrank_b'][0]))


# SGD is the exactness check. Adam divides by sqrt(v): on near-zero gradient
# entries it turns float summation-order differences (sharded vs not) into
# up to ~1e-4 parameter differences, against per-step updates of ~lr = 0.05;
# its check is that the sharded optimiser state works and stays close.
@pytest.mark.parametrize('optimizer,atol', [('sgd', 1e-6), ('adam', 1e-3)])
def test_wake_on_8_devices_matches_one_device(optimizer, atol):
  levels = [dict(lvl, num_experts=4, optimizer=optimizer)
            for lvl in sgd_levels()]
  model, params, state = make(levels, num_kv_heads=4)
  params, state = grown(model, params, state)
  stream = batches(6, batch=8)
  step1, shard1 = one_device_step(model)
  ws1 = start(model, params, state, shard1)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  shard8 = wake.wake_state_shardings(model, mesh, RULES,
                                     jnp.zeros((8, 8), jnp.int32))
  step8 = wake.compile_wake_step(model, shard8, mesh, RULES)
  ws8 = start(model, params, state, shard8)
  for t, batch in enumerate(stream):
    ws1, m1 = step1(ws1, batch, t == 5)
    ws8, m8 = step8(ws8, batch, t == 5)
    np.testing.assert_allclose(float(m8['loss']), float(m1['loss']), rtol=1e-5)
  a8 = ws8.params['layers_0']['mlp']['level_1']['lowrank_a']
  assert a8.sharding.spec[0] == 'tensor'        # experts split 4 ways
  assert a8.addressable_shards[0].data.shape[0] == 1
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), atol=atol), ws8.params, ws1.params)


def test_wake_config_errors():
  plain = tiny_config(vocab_size=50, num_layers=1)
  with pytest.raises(ValueError, match="model.mlp='swiglu'"):
    wake.init_wake_state(plain, {}, {})
  model, params, state = make([dict(chunk_size=0, width=16, rank=4)])
  with pytest.raises(ValueError, match='chunk_size=0'):
    wake.init_wake_state(model.config, params, state)


def test_regrown_slot_starts_with_no_wake_memory():
  levels = [dict(lvl, optimizer='adam') for lvl in sgd_levels()]
  model, params, state = make(levels)
  params, state = grown(model, params, state)
  step, shardings = one_device_step(model)
  ws = start(model, params, state, shardings)
  for t, batch in enumerate(batches(3)):  # level 1 (C=2) has a pending sum
    ws, _ = step(ws, batch, False)
  b_sum = lambda w: w.grad_sums[1]['layers_0']['mlp']['level_1']['lowrank_b']
  assert np.any(np.asarray(b_sum(ws)[0]))
  ws = wake.reset(ws, 1, [0])
  ws, slot = wake.grow(ws, 1, jax.random.key(7))
  assert slot == 0
  assert not np.any(np.asarray(b_sum(ws)[0]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(ws.opt_states[1]):
    if 'lowrank' in jax.tree_util.keystr(path):
      assert not np.any(np.asarray(leaf[0])), jax.tree_util.keystr(path)
  ws, _ = step(ws, batches(1, seed=5)[0], False)  # still runs, same program
  assert step.jitted._cache_size() == 1
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='unbox'):
    growth.grow(boxed['params'], {'cms': boxed['cms']}, 0, jax.random.key(0))


def test_wake_anchor_holds_the_model_to_the_frozen_copy():
  """weight 0 is the plain wake step exactly; a weight > 0 ends wake closer
  to the frozen model on its own samples, at the cost of the wake loss."""
  from sleep_jax.divergences import generalized_jsd
  model, params, state = make(sgd_levels())
  params, state = grown(model, params, state)
  mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  shardings = wake.wake_state_shardings(model, mesh, RULES,
                                        jnp.zeros((4, 8), jnp.int32))
  plain = wake.compile_wake_step(model, shardings, mesh, RULES)
  anchored = wake.compile_wake_step(model, shardings, mesh, RULES,
                                    anchored=True)
  rng = np.random.default_rng(1)
  samples = jnp.asarray(rng.integers(0, 50, (4, 8)), jnp.int32)
  sample_mask = jnp.ones((4, 8), jnp.float32)
  frozen = jax.tree.map(jnp.copy, (params, state))

  def run(step, weight=None):
    wake_state = start(model, params, state, shardings)
    for i, batch in enumerate(batches(8)):
      if weight is None:
        wake_state, _ = step(wake_state, batch, i == 7)
      else:
        wake_state, _ = step(
            wake_state, {**batch, 'anchor_tokens': samples,
                         'anchor_mask': sample_mask}, i == 7,
            {'params': frozen[0], 'model_state': frozen[1], 'weight': weight})
    return wake_state

  def distance(wake_state):
    student = model.apply(variables(wake_state.params, wake_state.model_state),
                          samples)
    teacher = model.apply(variables(*frozen), samples)
    return float(generalized_jsd(student, teacher, sample_mask, beta=0.5))

  free, zero, held = run(plain), run(anchored, 0.0), run(anchored, 30.0)
  for a, b in zip(jax.tree.leaves(free.params), jax.tree.leaves(zero.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert distance(free) > 0
  assert distance(held) < 0.75 * distance(free)
  with pytest.raises(ValueError, match='compiled with anchored=False'):
    plain(start(model, params, state, shardings), batches(1)[0], False,
          {'params': frozen[0], 'model_state': frozen[1], 'weight': 1.0})
