"""Knowledge Seeding's pre-wake anchor: + anchor_weight * F(A||S) on A's own
samples, A = the student at initialisation (sleep_jax.seeding)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import divergences
from sleep_jax import growth
from sleep_jax import seeding
from sleep_jax import seeding_rollouts
from sleep_jax import sharding
from seeding_setup import (ANCHORED, BOS, CFG, EOS, PAD, RULES, replay_rows,
                           run_consolidate)
from test_divergences import np_divergence
from tiny_models import teacher_with_fast_knowledge


def initial_student(params, state):
  """consolidate's student at initialisation: level 0 reset, a level-1 expert
  grown with B = 0."""
  params, state = growth.reset(params, state, 0, growth.active_slots(state, 0))
  params, state, _ = growth.grow(params, state, 1, jax.random.key(3))
  return params, state


# Jitted: one compile is quicker than the first run of op-by-op dispatch.
loss_of = jax.jit(seeding.seeding_loss, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def logits_of(model, params, state, tokens):
  return model.apply({'params': params, **state}, tokens)


def rows_batch(rows, keys=('gkd', 'anchor')):
  """Replay rows as seeding-batch rows (every position after BOS counts)."""
  tokens = jnp.asarray(rows['tokens'])
  col = np.arange(tokens.shape[1])[None]
  mask = jnp.asarray(col < rows['lengths'][:, None] - 1, jnp.float32)
  out = {}
  for key in keys:
    out[f'{key}_tokens'], out[f'{key}_mask'] = tokens, mask
  return out


def test_anchor_weight_zero_is_todays_consolidation_bit_for_bit(
    tiny_cms, monkeypatch, compile_counter):
  """The other anchor knobs change nothing at weight 0: the same compiled
  step and batch keys, nothing of the anchor drawn, sampled or compiled,
  bit-identical params and metrics (so no RNG stream moved either)."""
  model, params, state = tiny_cms
  params, state = teacher_with_fast_knowledge(params, state)
  knobs = dataclasses.replace(CFG, anchor_prompts='replay', anchor_batch_size=2,
                              anchor_max_new_tokens=3)
  assert seeding.batch_keys(knobs) == seeding.batch_keys(CFG)
  assert not any('anchor' in k for k in seeding.batch_keys(knobs))
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                            jax.devices()[:1])
  rules = tuple(tuple(r) for r in RULES)
  assert (seeding.compile_seeding_step(model, knobs, 1, mesh, rules)
          is seeding.compile_seeding_step(model, CFG, 1, mesh, rules))
  off = run_consolidate(model, params, state)

  def never(*args, **kwargs):
    raise AssertionError('the anchor was used with anchor_weight=0')
  monkeypatch.setattr(seeding_rollouts, 'anchor_rollout', never)
  monkeypatch.setattr(seeding_rollouts, 'draw_anchor_prompts', never)
  with compile_counter() as compiles:
    same = run_consolidate(model, params, state, knobs,
                           anchor_replay=replay_rows(seed=1))
  assert compiles() == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(off.params),
               jax.device_get(same.params))
  assert same.metrics == off.metrics
  assert not any('anchor' in k for k in same.metrics[0])


def test_anchored_consolidation_starts_at_zero_and_compiles_once(
    tiny_cms, monkeypatch, compile_counter):
  """Step 0's anchor divergence is 0: the anchor is the student at
  initialisation. The anchor continues prefixes of `anchor_replay`, and a
  second sleep cycle (a new anchor, new rows) compiles nothing. Step 0's
  GKD/LTI draws are those of the run without the anchor."""
  model, params, state = tiny_cms
  params, state = teacher_with_fast_knowledge(params, state)
  cfg = dataclasses.replace(ANCHORED, anchor_prompts='replay')
  seen = []
  real = seeding_rollouts.anchor_rollout

  def spy(model, cfg, anchor, prompts, lengths, *args, **kwargs):
    seen.append((np.asarray(prompts), np.asarray(lengths)))
    return real(model, cfg, anchor, prompts, lengths, *args, **kwargs)
  monkeypatch.setattr(seeding_rollouts, 'anchor_rollout', spy)
  earlier = replay_rows(seed=1)
  first = run_consolidate(model, params, state, cfg, anchor_replay=earlier)
  assert first.metrics[0]['anchor_divergence'] == pytest.approx(0.0, abs=1e-6)
  assert first.metrics[-1]['anchor_divergence'] > 1e-6  # the expert moved
  off = run_consolidate(model, params, state)
  for key in ('on_policy_fraction', 'reward', 'edit_reward'):
    assert first.metrics[0][key] == off.metrics[0][key], key
  assert len(seen) == cfg.num_steps
  for prompts, lengths in seen:
    assert prompts.shape == (cfg.anchor_batch_size, earlier['tokens'].shape[1])
    for row, n in zip(prompts, lengths):
      assert any(np.array_equal(row[:n], r[:n]) and n < length for r, length
                 in zip(earlier['tokens'], earlier['lengths'])), row
  params, state = teacher_with_fast_knowledge(first.params, first.model_state)
  with compile_counter() as compiles:
    run_consolidate(model, params, state, cfg, seed=1,
                    anchor_replay=replay_rows(seed=2))
  assert compiles() == 0
  step = seeding.compile_seeding_step(
      model, cfg, 1, sharding.make_mesh({'data': 1}, devices=jax.devices()[:1]),
      tuple(tuple(r) for r in RULES))
  assert step.jitted._cache_size() == 1


def test_the_anchor_is_the_pre_wake_model_not_the_teacher(tiny_cms):
  """On the anchor's own samples: the student at initialisation computes the
  pre-wake model (its logits), so F(A||S) = 0 there, while the teacher (with
  wake's fast expert) is far from it on the same rows."""
  model, base, base_state = tiny_cms
  teacher = teacher_with_fast_knowledge(base, base_state)
  student = initial_student(*teacher)
  rows = seeding_rollouts.anchor_rollout(
      model, ANCHORED, student, *seeding_rollouts.draw_anchor_prompts(
          None, ANCHORED, np.random.default_rng(0), BOS, PAD),
      jax.random.key(0), eos_id=EOS, pad_id=PAD)
  assert float(rows['anchor_mask'].sum()) > 0
  logits = lambda p, s: logits_of(model, p, s, rows['anchor_tokens'])
  np.testing.assert_allclose(logits(*student), logits(base, base_state),
                             atol=1e-5)
  # The GKD term on the same rows: D(teacher||student) vs D(anchor||student).
  batch = {**rows, 'gkd_tokens': rows['anchor_tokens'],
           'gkd_mask': rows['anchor_mask']}
  cfg = dataclasses.replace(ANCHORED, alpha=1.0)
  _, metrics = loss_of(model, cfg, *student, teacher, batch, student)
  assert float(metrics['anchor_divergence']) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics['divergence']) > 1e-3
  # The anchor argument is what the term uses: the teacher as anchor gives
  # the teacher's divergence.
  _, metrics = loss_of(model, cfg, *student, teacher, batch, teacher)
  np.testing.assert_allclose(metrics['anchor_divergence'],
                             metrics['divergence'], rtol=1e-6)


def test_anchor_term_is_its_weight_times_the_divergence_by_hand(tiny_cms):
  model, base, base_state = tiny_cms
  student = teacher_with_fast_knowledge(base, base_state)
  anchor, teacher = (base, base_state), initial_student(*student)
  batch = rows_batch(replay_rows(seed=4))
  off = dataclasses.replace(CFG, alpha=1.0, beta=0.3, temperature=2.0)
  on = dataclasses.replace(off, anchor_weight=0.7)
  loss_off, _ = loss_of(model, off, *student, teacher, batch)
  loss_on, metrics = loss_of(model, on, *student, teacher, batch, anchor)
  logits = lambda p, s: logits_of(model, p, s, batch['anchor_tokens'])
  by_hand = divergences.generalized_jsd(
      logits(*student), logits(*anchor), batch['anchor_mask'], beta=0.3,
      temperature=2.0)
  assert float(by_hand) > 1e-3
  np.testing.assert_allclose(metrics['anchor_divergence'], by_hand, rtol=1e-5)
  np.testing.assert_allclose(float(loss_on) - float(loss_off),
                             0.7 * float(by_hand), rtol=1e-4)
  # The same number from the numpy reference (student first, anchor second).
  np.testing.assert_allclose(by_hand, np_divergence(
      'jsd', np.asarray(logits(*student)), np.asarray(logits(*anchor)),
      np.asarray(batch['anchor_mask']), 0.3, 2.0), rtol=1e-4)


@pytest.mark.parametrize('key,value,message', [
    ('anchor_weight', -0.5, r'sleep\.anchor_weight=-0\.5 must be >= 0'),
    ('anchor_prompts', 'web', r"sleep\.anchor_prompts='web'; valid: "
                              r"\['bos', 'replay'\]"),
    ('anchor_batch_size', 0, r'sleep\.anchor_batch_size=0 must be >= 1'),
    ('anchor_max_new_tokens', 0,
     r'sleep\.anchor_max_new_tokens=0 must be >= 1'),
])
def test_bad_anchor_knobs_fail_at_config_time(key, value, message):
  with pytest.raises(ValueError, match=message):
    seeding.SeedingConfig.from_dict({key: value})


def test_anchor_needs_its_model_and_rows_that_fit_the_mesh(tiny_cms):
  model, params, state = tiny_cms
  cfg = dataclasses.replace(ANCHORED, alpha=1.0)
  with pytest.raises(ValueError, match=r'sleep\.anchor_weight=1\.0 > 0 needs '
                     r'the anchor model'):
    seeding.seeding_loss(model, cfg, params, state, (params, state),
                         rows_batch(replay_rows()))
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  with pytest.raises(ValueError, match=r'sleep\.anchor_batch_size=3 must '
                     r'divide evenly over the 2 data-parallel devices'):
    seeding.consolidate(model, params, state, level=1, replay=replay_rows(),
                        cfg=dataclasses.replace(cfg, anchor_batch_size=3),
                        rng=jax.random.key(0), bos_id=BOS, eos_id=EOS,
                        mesh=mesh)
