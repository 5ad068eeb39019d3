"""Knowledge Seeding (docs/design.md §4): config, the KS step, consolidate.

The pre-wake anchor: test_seeding_anchor.py; prompts and rollouts:
test_seeding_rollouts.py.
"""

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import growth
from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import seeding_rollouts
from sleep_jax import sharding
from seeding_setup import (BOS, CFG, EOS, PAD, RULES, digits, make_model,
                           replay_rows, run_consolidate)
from tiny_models import teacher_with_fast_knowledge


# ------------------------------------------------------------- config ---


@pytest.mark.parametrize('key,value,message', [
    ('alpha', 2.0, r'sleep\.alpha=2\.0 must be in \[0, 1\]'),
    ('lmbda', -0.1, r'sleep\.lmbda=-0\.1 must be in \[0, 1\]'),
    ('gamma', 1.5, r'sleep\.gamma=1\.5'),
    ('beta', 1.01, r'sleep\.beta=1\.01'),
    ('z0', -1, r'sleep\.z0=-1 must be >= 0'),
    ('group_size', 1, r'sleep\.group_size=1: LTI needs >= 2'),
    ('divergence', 'tvd', r"sleep\.divergence='tvd'; valid"),
    ('judge', 'gpt', r"sleep\.judge='gpt'; valid"),
    ('prompt_source', 'web', r"sleep\.prompt_source='web'"),
])
def test_out_of_range_knobs_fail_at_config_time(key, value, message):
  with pytest.raises(ValueError, match=message):
    seeding.SeedingConfig.from_dict({key: value})


def test_config_accepts_group_of_one_without_lti_and_rejects_unknown_keys():
  assert seeding.SeedingConfig(alpha=1.0, group_size=1).group_size == 1
  with pytest.raises(ValueError, match=r"sleep: unknown keys \['lambda'\]"):
    seeding.SeedingConfig.from_dict({'lambda': 0.5})


# ---------------------------------------------------------- the KS step ---


@pytest.mark.parametrize('alpha,experts', [(0.0, 1), (0.5, 1), (1.0, 1),
                                           (0.5, 2)])
def test_only_the_new_experts_and_their_router_rows_change(alpha, experts):
  # Room in the slow level's top-k for every new expert, so each trains.
  model, params, state = make_model(slow_top_k=1 + experts)
  params, state = teacher_with_fast_knowledge(params, state)
  fast_slots = growth.active_slots(state, 0)
  out = run_consolidate(model, params, state, dataclasses.replace(
      CFG, alpha=alpha, num_steps=4, experts=experts))
  slots = out.grown_slots
  assert len(set(slots)) == experts
  assert out.reset_slots == fast_slots
  assert growth.active_slots(out.model_state, 1) == sorted(slots)
  assert growth.active_slots(out.model_state, 0) == []
  before = traverse_util.flatten_dict(params, sep='/')
  after = traverse_util.flatten_dict(jax.device_get(out.params), sep='/')
  changed = []
  for path, old in before.items():
    new, old = np.asarray(after[path]), np.asarray(old)
    if 'level_1/lowrank' in path:
      keep = np.isin(np.arange(old.shape[0]), slots, invert=True)
      np.testing.assert_array_equal(new[keep], old[keep], err_msg=path)
      changed += [not np.array_equal(new[s], old[s]) for s in slots]
    elif 'level_1/router' in path:
      keep = np.isin(np.arange(old.shape[1]), slots, invert=True)
      np.testing.assert_array_equal(new[:, keep], old[:, keep], err_msg=path)
      changed += [not np.array_equal(new[:, s], old[:, s]) for s in slots]
    elif 'level_0/lowrank' in path:   # consolidated fast experts are freed
      np.testing.assert_array_equal(new[fast_slots], 0.0, err_msg=path)
      keep = np.isin(np.arange(old.shape[0]), fast_slots, invert=True)
      np.testing.assert_array_equal(new[keep], old[keep], err_msg=path)
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)
  assert all(changed), 'a new expert did not train'
  assert len(out.metrics) == 4 and np.isfinite(out.metrics[-1]['loss'])


def test_seeding_moves_the_student_towards_the_teacher(tiny_cms):
  model, params, state = tiny_cms
  params, state = teacher_with_fast_knowledge(params, state)
  rows = replay_rows()
  tokens = jnp.asarray(rows['tokens'])
  mask = (np.arange(tokens.shape[1])[None] < rows['lengths'][:, None] - 1)

  def gap(p, s):  # forward KL(teacher || model) on the replay rows
    logits = lambda p, s: model.apply({'params': p, **s}, tokens)
    return float(seeding.forward_kl(logits(p, s), logits(params, state), mask))

  student = growth.reset(params, state, 0, growth.active_slots(state, 0))
  cfg = dataclasses.replace(CFG, alpha=1.0, lmbda=0.0, num_steps=30,
                            batch_size=8, learning_rate=0.03,
                            prompt_source='replay')
  out = run_consolidate(model, params, state, cfg)
  before, after = gap(*student), gap(out.params, out.model_state)
  assert before > 0.05 and after < 0.5 * before, (before, after)


def test_ks_step_on_8_devices_matches_one_device():
  model, params, state = make_model(num_kv_heads=4)
  params, state = teacher_with_fast_knowledge(params, state)
  teacher = (params, state)
  student_params, student_state = growth.reset(params, state, 0, [0])
  student_params, student_state, slot = growth.grow(
      student_params, student_state, 1, jax.random.key(3))
  slots_E = jnp.arange(4) == slot
  cfg = dataclasses.replace(CFG, batch_size=4, group_size=2)
  prompts, lengths = seeding_rollouts.draw_prompts(
      replay_rows(), cfg, np.random.default_rng(0), BOS, PAD)
  batches = [seeding_rollouts.rollout(
      model, cfg, (student_params, student_state), teacher, prompts, lengths,
      jax.random.key(i), eos_id=EOS, pad_id=PAD,
      host_rng=np.random.default_rng(i), judge=rewards.ExactJudge(),
      decode=digits).batch for i in range(3)]
  results = []
  for mesh in (sharding.make_mesh({'data': 1}, devices=jax.devices()[:1]),
               sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})):
    rules = tuple(tuple(r) for r in RULES)
    step = seeding.compile_seeding_step(model, cfg, 1, mesh, rules)
    shardings = step.state_shardings
    st = jax.device_put(seeding.init_seeding_state(
        cfg, student_params, student_state, 1), shardings, may_alias=False)
    tch = jax.device_put(teacher, (shardings.params, shardings.model_state))
    for batch in batches:
      st, _ = step(st, batch, tch, slots_E)
    results.append(jax.device_get(st.params))
    if mesh.shape['tensor'] == 4:   # experts really are split 4 ways
      a = st.params['layers_0']['mlp']['level_1']['lowrank_a']
      assert a.addressable_shards[0].data.shape[0] == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4),
               *results)


def test_consolidation_compiles_once_across_sleep_cycles(tiny_cms,
                                                        compile_counter):
  model, params, state = tiny_cms
  params, state = teacher_with_fast_knowledge(params, state)
  first = run_consolidate(model, params, state, seed=0)
  # Next day: a new fast expert learns something, then sleep again.
  params, state = teacher_with_fast_knowledge(first.params, first.model_state)
  with compile_counter() as compiles:
    second = run_consolidate(model, params, state, seed=1)
  assert compiles() == 0
  assert second.grown_slots != first.grown_slots
  step = seeding.compile_seeding_step(
      model, CFG, 1, sharding.make_mesh({'data': 1}, devices=jax.devices()[:1]),
      tuple(tuple(r) for r in RULES))
  assert step.jitted._cache_size() == 1


def test_consolidate_errors_name_the_problem(tiny_cms):
  model, params, state = tiny_cms
  with pytest.raises(ValueError, match=r'level=0 must name a slower level'):
    seeding.consolidate(model, params, state, level=0, replay=replay_rows(),
                        cfg=CFG, rng=jax.random.key(0), bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match=r'sleep.gamma=0.5 > 0 needs a semantic '
                     r'judge'):
    seeding.consolidate(model, params, state, level=1, replay=replay_rows(),
                        cfg=CFG, rng=jax.random.key(0), bos_id=BOS, eos_id=EOS)
