"""Knowledge Seeding (docs/design.md §4): divergences, KS step, consolidate."""

import dataclasses
import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import divergences
from sleep_jax import growth
from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import sequences
from sleep_jax import sharding
from sleep_jax.models import Transformer, TransformerConfig

RULES = sharding.DEFAULT_RULES
BOS, EOS, PAD = 1, 2, 0


# ------------------------------------------------- numpy reference ---------


def np_log_softmax(logits, temperature):
  z = logits.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, q):
  """KL(p || q) per position from probabilities."""
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def np_divergence(kind, student, teacher, mask, beta=0.5, temperature=1.0):
  s = np.exp(np_log_softmax(student, temperature))
  t = np.exp(np_log_softmax(teacher, temperature))
  if kind == 'forward':
    per = np_kl(t, s)
  elif kind == 'reverse':
    per = np_kl(s, t)
  else:  # TRL: M = (1 - beta) S + beta T; beta KL(T||M) + (1 - beta) KL(S||M)
    m = (1 - beta) * s + beta * t
    per = beta * np_kl(t, m) + (1 - beta) * np_kl(s, m)
  return float(np.sum(per * mask) / np.sum(mask))


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(3, 5, 11)) * 2
  teacher = rng.normal(size=(3, 5, 11)) * 2
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  mask[0, 0] = 1.0
  return student.astype(np.float32), teacher.astype(np.float32), mask


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_divergences_match_numpy_reference(logits, temperature):
  s, t, mask = logits
  fwd = seeding.forward_kl(s, t, mask, temperature=temperature)
  rev = seeding.reverse_kl(s, t, mask, temperature=temperature)
  np.testing.assert_allclose(fwd, np_divergence('forward', s, t, mask,
                                                temperature=temperature), rtol=1e-5)
  np.testing.assert_allclose(rev, np_divergence('reverse', s, t, mask,
                                                temperature=temperature), rtol=1e-5)
  for beta in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(
        seeding.generalized_jsd(s, t, mask, beta=beta, temperature=temperature),
        np_divergence('jsd', s, t, mask, beta, temperature), rtol=1e-5)
  # Endpoints in TRL's convention.
  np.testing.assert_allclose(seeding.generalized_jsd(
      s, t, mask, beta=0.0, temperature=temperature), fwd, rtol=1e-6)
  np.testing.assert_allclose(seeding.generalized_jsd(
      s, t, mask, beta=1.0, temperature=temperature), rev, rtol=1e-6)
  assert abs(float(fwd) - float(rev)) > 1e-3  # the endpoints really differ


def test_jsd_symmetry_zero_and_masking(logits):
  s, t, mask = logits
  np.testing.assert_allclose(seeding.generalized_jsd(s, t, mask, beta=0.5),
                             seeding.generalized_jsd(t, s, mask, beta=0.5),
                             rtol=1e-6)
  assert abs(float(seeding.generalized_jsd(s, t, mask, beta=0.3))
             - float(seeding.generalized_jsd(t, s, mask, beta=0.3))) > 1e-4
  for fn in (seeding.forward_kl, seeding.reverse_kl,
             lambda a, b, m: seeding.generalized_jsd(a, b, m, beta=0.5)):
    assert float(fn(s, s, mask)) == pytest.approx(0.0, abs=1e-6)
    # Garbage (even NaN) at masked positions changes nothing.
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0] = np.nan
    t2[mask == 0] = 1e4
    np.testing.assert_allclose(fn(s2, t2, mask), fn(s, t, mask), rtol=1e-6)


def test_join_places_completion_after_prompt_and_masks_its_logits():
  prompt = jnp.array([[5, 6, 7, 0], [5, 0, 0, 0]])
  completion = jnp.array([[8, 9, 0], [3, 4, 2]])
  tokens, mask = sequences.join(prompt, jnp.array([3, 1]), completion,
                                jnp.array([2, 3]))
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 8, 9, 0, 0],
                                         [5, 3, 4, 2, 0, 0, 0]])
  # logits at t predict token t + 1: positions 2, 3 predict 8, 9.
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0, 0],
                                       [1, 1, 1, 0, 0, 0, 0]])


def test_group_advantages_subtract_group_mean():
  r = np.array([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
  adv = seeding.group_advantages(r, normalize=False)
  np.testing.assert_allclose(adv, [[0.5, -0.5, 0, 0], [0, 0, 0, 0]], atol=1e-7)
  norm = seeding.group_advantages(r, normalize=True)
  np.testing.assert_allclose(norm[0], adv[0] / (r[0].std() + 1e-6), rtol=1e-6)


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


def make_model(num_experts=4, num_kv_heads=2, slow_top_k=2):
  levels = [dict(chunk_size=1, width=16, num_experts=num_experts, rank=4,
                 top_k=2, learning_rate=0.01, optimizer='adam'),
            dict(chunk_size=0, width=32, num_experts=num_experts, rank=4,
                 top_k=slow_top_k, learning_rate=0.0, optimizer='adam')]
  config = TransformerConfig.from_dict(dict(
      vocab_size=40, d_model=32, num_layers=2, num_heads=4,
      num_kv_heads=num_kv_heads,
      d_ff=48, max_len=64, mlp='cms', cms_levels=levels))
  model = Transformer(config)
  var = dict(nn.meta.unbox(model.init(jax.random.key(0),
                                      jnp.zeros((2, 8), jnp.int32))))
  params = var.pop('params')
  return model, params, var


def teacher_with_fast_knowledge(model, params, state):
  """A level-0 expert that changes the function (B != 0)."""
  params, state, slot = growth.grow(params, state, 0, jax.random.key(7))
  flat = traverse_util.flatten_dict(params, sep='/')
  for path in flat:
    if 'level_0/lowrank_b' in path:
      noise = jax.random.normal(jax.random.key(len(path)), flat[path].shape[1:])
      flat[path] = flat[path].at[slot].set(2.0 * noise)
  return traverse_util.unflatten_dict(flat, sep='/'), state


def replay_rows(n=8, width=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 40, (n, width)).astype(np.int32)
  tokens[:, 0] = BOS
  lengths = rng.integers(4, width + 1, n).astype(np.int32)
  for i, length in enumerate(lengths):
    tokens[i, length:] = PAD
  return {'tokens': tokens, 'lengths': lengths}


def digits(ids):
  return ' '.join(map(str, ids))


CFG = seeding.SeedingConfig(alpha=0.5, lmbda=0.5, gamma=0.5, judge='exact',
                            num_steps=3, batch_size=4, group_size=2,
                            max_new_tokens=6, learning_rate=0.05)


def run_consolidate(model, params, state, cfg=CFG, mesh=None, seed=0,
                    **kwargs):
  return seeding.consolidate(
      model, params, state, level=1, replay=replay_rows(), cfg=cfg,
      rng=jax.random.key(seed), bos_id=BOS, eos_id=EOS, pad_id=PAD,
      judge=rewards.ExactJudge(), decode=digits, mesh=mesh, **kwargs)


@pytest.mark.parametrize('alpha,experts', [(0.0, 1), (0.5, 1), (1.0, 1),
                                           (0.5, 2)])
def test_only_the_new_experts_and_their_router_rows_change(alpha, experts):
  # Room in the slow level's top-k for every new expert, so each trains.
  model, params, state = make_model(slow_top_k=1 + experts)
  params, state = teacher_with_fast_knowledge(model, params, state)
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


def test_seeding_moves_the_student_towards_the_teacher():
  model, params, state = make_model()
  params, state = teacher_with_fast_knowledge(model, params, state)
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
  model, params, state = make_model(num_experts=4, num_kv_heads=4)
  params, state = teacher_with_fast_knowledge(model, params, state)
  teacher = (params, state)
  student_params, student_state = growth.reset(params, state, 0, [0])
  student_params, student_state, slot = growth.grow(
      student_params, student_state, 1, jax.random.key(3))
  slots_E = jnp.arange(4) == slot
  cfg = dataclasses.replace(CFG, batch_size=4, group_size=2)
  prompts, lengths = seeding.draw_prompts(replay_rows(), cfg,
                                          np.random.default_rng(0), BOS, PAD)
  batches = [seeding.rollout(model, cfg, (student_params, student_state),
                             teacher, prompts, lengths, jax.random.key(i),
                             eos_id=EOS, pad_id=PAD,
                             host_rng=np.random.default_rng(i),
                             judge=rewards.ExactJudge(), decode=digits).batch
             for i in range(3)]
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


def test_consolidation_compiles_once_across_sleep_cycles(compile_counter):
  model, params, state = make_model()
  params, state = teacher_with_fast_knowledge(model, params, state)
  first = run_consolidate(model, params, state, seed=0)
  # Next day: a new fast expert learns something, then sleep again.
  params, state = teacher_with_fast_knowledge(model, first.params,
                                              first.model_state)
  with compile_counter() as compiles:
    second = run_consolidate(model, params, state, seed=1)
  assert compiles() == 0
  assert second.grown_slots != first.grown_slots
  step = seeding.compile_seeding_step(
      model, CFG, 1, sharding.make_mesh({'data': 1}, devices=jax.devices()[:1]),
      tuple(tuple(r) for r in RULES))
  assert step.jitted._cache_size() == 1


def test_consolidate_errors_name_the_problem():
  model, params, state = make_model()
  with pytest.raises(ValueError, match=r'level=0 must name a slower level'):
    seeding.consolidate(model, params, state, level=0, replay=replay_rows(),
                        cfg=CFG, rng=jax.random.key(0), bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match=r'sleep.gamma=0.5 > 0 needs a semantic '
                     r'judge'):
    seeding.consolidate(model, params, state, level=1, replay=replay_rows(),
                        cfg=CFG, rng=jax.random.key(0), bos_id=BOS, eos_id=EOS)


# ----------------------------------------------------- the pre-wake anchor ---

ANCHORED = dataclasses.replace(CFG, anchor_weight=1.0, anchor_batch_size=4,
                               anchor_max_new_tokens=5)


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
    monkeypatch, compile_counter):
  """The other anchor knobs change nothing at weight 0: the same compiled
  step and batch keys, nothing of the anchor drawn, sampled or compiled,
  bit-identical params and metrics (so no RNG stream moved either)."""
  model, params, state = make_model()
  params, state = teacher_with_fast_knowledge(model, params, state)
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
  monkeypatch.setattr(seeding, 'anchor_rollout', never)
  monkeypatch.setattr(seeding, 'draw_anchor_prompts', never)
  with compile_counter() as compiles:
    same = run_consolidate(model, params, state, knobs,
                           anchor_replay=replay_rows(seed=1))
  assert compiles() == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(off.params),
               jax.device_get(same.params))
  assert same.metrics == off.metrics
  assert not any('anchor' in k for k in same.metrics[0])


def test_anchored_consolidation_starts_at_zero_and_compiles_once(
    monkeypatch, compile_counter):
  """Step 0's anchor divergence is 0: the anchor is the student at
  initialisation. The anchor continues prefixes of `anchor_replay`, and a
  second sleep cycle (a new anchor, new rows) compiles nothing. Step 0's
  GKD/LTI draws are those of the run without the anchor."""
  model, params, state = make_model()
  params, state = teacher_with_fast_knowledge(model, params, state)
  cfg = dataclasses.replace(ANCHORED, anchor_prompts='replay')
  seen = []
  real = seeding.anchor_rollout

  def spy(model, cfg, anchor, prompts, lengths, *args, **kwargs):
    seen.append((np.asarray(prompts), np.asarray(lengths)))
    return real(model, cfg, anchor, prompts, lengths, *args, **kwargs)
  monkeypatch.setattr(seeding, 'anchor_rollout', spy)
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
  params, state = teacher_with_fast_knowledge(model, first.params,
                                              first.model_state)
  with compile_counter() as compiles:
    run_consolidate(model, params, state, cfg, seed=1,
                    anchor_replay=replay_rows(seed=2))
  assert compiles() == 0
  step = seeding.compile_seeding_step(
      model, cfg, 1, sharding.make_mesh({'data': 1}, devices=jax.devices()[:1]),
      tuple(tuple(r) for r in RULES))
  assert step.jitted._cache_size() == 1


def test_the_anchor_is_the_pre_wake_model_not_the_teacher():
  """On the anchor's own samples: the student at initialisation computes the
  pre-wake model (its logits), so F(A||S) = 0 there, while the teacher (with
  wake's fast expert) is far from it on the same rows."""
  model, base, base_state = make_model()
  teacher = teacher_with_fast_knowledge(model, base, base_state)
  student = initial_student(*teacher)
  rows = seeding.anchor_rollout(
      model, ANCHORED, student, *seeding.draw_anchor_prompts(
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


def test_anchor_term_is_its_weight_times_the_divergence_by_hand():
  model, base, base_state = make_model()
  student = teacher_with_fast_knowledge(model, base, base_state)
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


def test_anchor_needs_its_model_and_rows_that_fit_the_mesh():
  model, params, state = make_model()
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


def test_anchor_prompts_are_earlier_rows_prefixes_else_bos():
  rows = replay_rows(n=5, seed=3)
  cfg = dataclasses.replace(ANCHORED, anchor_prompts='replay',
                            anchor_batch_size=32, min_prompt_tokens=2)
  prompts, lengths = seeding.draw_anchor_prompts(
      rows, cfg, np.random.default_rng(0), BOS, PAD)
  assert prompts.shape == (32, rows['tokens'].shape[1])
  used = set()
  for row, n in zip(prompts, lengths):
    assert n >= 2 and np.all(row[n:] == PAD)
    match = [i for i, (r, length) in enumerate(zip(rows['tokens'],
                                                   rows['lengths']))
             if np.array_equal(row[:n], r[:n]) and n < length]
    assert match, row
    used.update(match)
  assert len(used) > 1
  empty = {'tokens': np.zeros((0, 12), np.int32),
           'lengths': np.zeros((0,), np.int32)}
  for earlier, c in ((None, cfg), (empty, cfg),
                     (rows, dataclasses.replace(cfg, anchor_prompts='bos'))):
    bos, ones = seeding.draw_anchor_prompts(
        earlier, c, np.random.default_rng(0), BOS, PAD)
    np.testing.assert_array_equal(bos, np.full((32, 1), BOS))
    np.testing.assert_array_equal(ones, 1)
  # The anchor's rows are prompt ++ its completion; the loss covers the
  # completion only.
  model, params, state = make_model()
  out = seeding.anchor_rollout(model, cfg, (params, state), prompts[:4],
                               lengths[:4], jax.random.key(0), eos_id=EOS,
                               pad_id=PAD)
  tokens = np.asarray(out['anchor_tokens'])
  mask = np.asarray(out['anchor_mask'])
  assert tokens.shape == (4, prompts.shape[1] + cfg.anchor_max_new_tokens)
  for b, n in enumerate(lengths[:4]):
    np.testing.assert_array_equal(tokens[b, :n], prompts[b, :n])
    assert mask[b, :n - 1].sum() == 0 and mask[b, n - 1] == 1
