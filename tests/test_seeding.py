"""Knowledge Seeding (DESIGN §4): divergences, the KS step, consolidate()."""

import dataclasses

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def make_model(num_experts=4, num_kv_heads=2):
  levels = [dict(chunk_size=1, width=16, num_experts=num_experts, rank=4,
                 top_k=2, learning_rate=0.01, optimizer='adam'),
            dict(chunk_size=0, width=32, num_experts=num_experts, rank=4,
                 top_k=2, learning_rate=0.0, optimizer='adam')]
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


def run_consolidate(model, params, state, cfg=CFG, mesh=None, seed=0):
  return seeding.consolidate(
      model, params, state, level=1, replay=replay_rows(), cfg=cfg,
      rng=jax.random.key(seed), bos_id=BOS, eos_id=EOS, pad_id=PAD,
      judge=rewards.ExactJudge(), decode=digits, mesh=mesh)


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0])
def test_only_the_new_expert_and_its_router_row_change(alpha):
  model, params, state = make_model()
  params, state = teacher_with_fast_knowledge(model, params, state)
  fast_slots = growth.active_slots(state, 0)
  out = run_consolidate(model, params, state,
                        dataclasses.replace(CFG, alpha=alpha, num_steps=4))
  slot = out.grown_slot
  assert out.reset_slots == fast_slots
  assert growth.active_slots(out.model_state, 1) == [slot]
  assert growth.active_slots(out.model_state, 0) == []
  before = traverse_util.flatten_dict(params, sep='/')
  after = traverse_util.flatten_dict(jax.device_get(out.params), sep='/')
  changed = []
  for path, old in before.items():
    new, old = np.asarray(after[path]), np.asarray(old)
    if 'level_1/lowrank' in path:
      keep = np.arange(old.shape[0]) != slot
      np.testing.assert_array_equal(new[keep], old[keep], err_msg=path)
      changed.append(not np.array_equal(new[slot], old[slot]))
    elif 'level_1/router' in path:
      keep = np.arange(old.shape[1]) != slot
      np.testing.assert_array_equal(new[:, keep], old[:, keep], err_msg=path)
      changed.append(not np.array_equal(new[:, slot], old[:, slot]))
    elif 'level_0/lowrank' in path:   # consolidated fast experts are freed
      np.testing.assert_array_equal(new[fast_slots], 0.0, err_msg=path)
      keep = np.isin(np.arange(old.shape[0]), fast_slots, invert=True)
      np.testing.assert_array_equal(new[keep], old[keep], err_msg=path)
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)
  assert all(changed), 'the new expert did not train'
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
  assert second.grown_slot != first.grown_slot
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
