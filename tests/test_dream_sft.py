"""Dreaming's SFT programs (sleep_jax.dream_sft): isolated evaluation of
each dream's copy, rehearsal with its generative-replay anchor."""

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax import dream_sft
from sleep_jax.models import lora
from dreaming_setup import (BOS, CFG, EOS, PAD, items_about, make_model,
                            random_rows)
from tiny_models import teacher_with_fast_knowledge


# ----------------------------------------------------- isolated evaluation ---


def _text_copies(cfg, n=6):
  raw, raw_len = random_rows(n, 7, seed=3)
  dreams, lengths = raw[:, 1:], raw_len - 1
  tokens, masks = dream_sft.dream_rows(dreams, lengths, bos_id=BOS, pad_id=PAD)
  return (dream_sft.dream_copies(tokens, masks, cfg),
          items_about(dreams, lengths, 3, seed=4))


def test_vmapped_evaluation_matches_a_python_loop():
  """The 'accuracy' tau on a CMS model; tests/test_arc.py checks the same
  with 'answer_logprob' and per-copy learning rates and step counts."""
  model, params, state, _ = make_model()
  cfg = dataclasses.replace(CFG, tau='accuracy', eval_steps=4,
                            eval_learning_rate=0.02)
  n = 6
  data, items = _text_copies(cfg, n)
  rng = jax.random.key(5)
  together = dream_sft.evaluate(model, cfg, params, state, rng, data, items)
  one = jax.jit(lambda key, d, it: dream_sft.isolated_copy(
      model, cfg, params, state, key, d, it))
  keys = dream_sft.copy_keys(rng, n)
  for i in range(n):
    before, after, adapter = one(keys[i], jax.tree.map(lambda x: x[i], data),
                                 {k: v[i] for k, v in items.items()})
    np.testing.assert_allclose(together.tau_before[i], before, atol=1e-5)
    np.testing.assert_allclose(together.tau_after[i], after, atol=1e-5)
    assert float(together.reward[i]) == float(after > before)
    for x, y in zip(jax.tree.leaves(lora.take(together.adapters, i)),
                    jax.tree.leaves(adapter)):
      np.testing.assert_allclose(x, y, atol=1e-5)
  # Chunked (4 lanes at a time, 6 copies) is the same program's result.
  chunked = dream_sft.evaluate(model, dataclasses.replace(cfg, chunk_size=4),
                              params, state, rng, data, items)
  np.testing.assert_allclose(chunked.tau_after, together.tau_after, atol=1e-5)
  np.testing.assert_array_equal(chunked.reward, together.reward)


def test_inactive_steps_train_nothing():
  """An inactive step (ARC strategies have fewer steps than the scan) leaves
  the adapter and its Adam state exactly as they were; an active one on the
  same batch moves them."""
  model, params, state, _ = make_model()
  cfg = dataclasses.replace(CFG, eval_learning_rate=0.05)
  data, _ = _text_copies(cfg, 1)
  adapter = lora.init(params, cfg.lora, jax.random.key(3))
  carry = (adapter, optax.adam(0.05).init(adapter))
  step = jax.jit(lambda c, active: dream_sft.copy_sft_step(
      model, cfg, params, state, 0.05, c,
      (data.tokens[0, 0], data.mask[0, 0], active))[0])
  for _ in range(2):  # the second step starts from b != 0
    moved = step(carry, True)
    for x, y in zip(jax.tree.leaves(step(moved, False)),
                    jax.tree.leaves(moved)):
      np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(moved), jax.tree.leaves(carry)))
    carry = moved


def test_benchmark_flops_count_every_sft_step():
  """benchmarks.dreaming's FLOPs per copy against XLA's count of the same
  copy written without a loop (tau of the base model, each step in Python,
  tau with the trained LoRA): XLA counts a loop body once, so the scanned
  program's own count would miss steps."""
  from benchmarks import dreaming as benchmark
  model, params, state, _ = make_model()
  cfg = dataclasses.replace(CFG, eval_steps=2)
  data, items = _text_copies(cfg, 1)
  data = jax.tree.map(lambda x: x[0], data)
  items = {k: jnp.asarray(v[0]) for k, v in items.items()}
  key = jax.random.key(0)

  def straight_line(params):
    adapter = lora.init(params, cfg.lora, key)
    carry = (adapter, optax.adam(data.learning_rate).init(adapter))
    out = [dream_sft.tau(model, params, state, items, cfg.tau)]
    for s in range(cfg.eval_steps):
      carry, _ = dream_sft.copy_sft_step(
          model, cfg, params, state, data.learning_rate, carry,
          (data.tokens[s], data.mask[s], data.active[s]))
    out.append(dream_sft.tau(model, params, state, items, cfg.tau, carry[0],
                             cfg))
    return out

  reference = benchmark._flops(straight_line, params)
  counted = benchmark._copy_flops(model, cfg, params, state, key, data, items)
  # Fusion moves XLA's count of elementwise work by a few percent (5% on an
  # H100); one step missed would be over 20%.
  np.testing.assert_allclose(counted, reference, rtol=0.1)


def test_sft_on_a_dream_raises_the_likelihood_of_an_item_about_it():
  model, params, state, _ = make_model()
  cfg = dataclasses.replace(CFG, tau='answer_logprob', eval_steps=4,
                            eval_learning_rate=0.02)
  data, items = _text_copies(cfg)
  result = dream_sft.evaluate(model, cfg, params, state, jax.random.key(5),
                              data, items)
  assert np.all(np.asarray(result.tau_after) > np.asarray(result.tau_before))
  np.testing.assert_array_equal(result.reward, 1.0)


@pytest.mark.parametrize('with_replay', [False, True])
def test_rehearsal_trains_only_the_unlocked_slot(with_replay):
  model, params, state, slot = make_model()
  tokens, lengths = random_rows(5, 8, seed=2)
  rows, mask = dream_sft.dream_rows(tokens[:, 1:], lengths - 1, bos_id=BOS,
                                   pad_id=PAD)
  replay = None
  if with_replay:
    replay = dream_sft.self_replay(model, dataclasses.replace(
        CFG, replay_samples=3), params, state, jax.random.key(0), bos_id=BOS,
        eos_id=EOS, pad_id=PAD)
    assert replay['tokens'].shape == (3, 7) and replay['mask'].sum() > 0
  after, losses = dream_sft.rehearse(
      model, CFG, params, state, np.asarray(rows), np.asarray(mask), level=1,
      slots=[slot], host_rng=np.random.default_rng(0), replay=replay)
  assert losses.shape == (CFG.rehearse_steps,)
  before = traverse_util.flatten_dict(params, sep='/')
  after = traverse_util.flatten_dict(jax.device_get(after), sep='/')
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
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)
  assert changed and all(changed)


def dream_rows_and_replay(model, params, state, anchor=None):
  tokens, lengths = random_rows(5, 8, seed=2)
  rows, mask = dream_sft.dream_rows(tokens[:, 1:], lengths - 1, bos_id=BOS,
                                   pad_id=PAD)
  replay = dream_sft.self_replay(
      model, dataclasses.replace(CFG, replay_samples=3), params, state,
      jax.random.key(0), bos_id=BOS, eos_id=EOS, pad_id=PAD, anchor=anchor)
  return np.asarray(rows), np.asarray(mask), replay


def test_rehearsal_anchored_to_the_model_before_is_the_default():
  """anchor=(params, model_state) of the model before rehearsal is the same
  model as anchor=None: the same replay rows, bit-identical params and
  losses."""
  model, params, state, slot = make_model()
  rows, mask, replay = dream_rows_and_replay(model, params, state)
  _, _, same_replay = dream_rows_and_replay(model, params, state,
                                            anchor=(params, state))
  for key in replay:
    np.testing.assert_array_equal(same_replay[key], replay[key])
  run = lambda anchor: dream_sft.rehearse(
      model, CFG, params, state, rows, mask, level=1, slots=[slot],
      host_rng=np.random.default_rng(0), replay=replay, anchor=anchor)
  default, losses = run(None)
  anchored, anchored_losses = run((params, state))
  np.testing.assert_array_equal(anchored_losses, losses)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(anchored),
               jax.device_get(default))


def np_forward_kl(student_logits, teacher_logits, mask):
  """KL(teacher || student) per masked position, averaged (numpy, float64)."""
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  log_s, log_t = log_softmax(student_logits), log_softmax(teacher_logits)
  per = (np.exp(log_t) * (log_t - log_s)).sum(-1)
  return float((per * mask).sum() / max(mask.sum(), 1.0))


def test_rehearsal_replays_and_distils_from_a_given_anchor():
  """With another model as anchor (other params, other expert masks), the
  replay rows are its samples and the replay term's teacher is it: at step
  0 the student is the model before rehearsal, so the first loss is the SFT
  loss + rehearse_replay * KL(anchor || model), computed here by hand (and
  with no anchor the KL term is 0)."""
  model, params, state, slot = make_model()
  anchor = teacher_with_fast_knowledge(params, state)
  assert not np.array_equal(anchor[1]['cms']['level_0'],
                            state['cms']['level_0'])
  rows, mask, replay = dream_rows_and_replay(model, params, state,
                                             anchor=anchor)
  _, _, own = dream_rows_and_replay(model, *anchor)
  for key in replay:
    np.testing.assert_array_equal(replay[key], own[key])
  first_loss = lambda anchor: dream_sft.rehearse(
      model, CFG, params, state, rows, mask, level=1, slots=[slot],
      host_rng=np.random.default_rng(0), replay=replay, anchor=anchor)[1][0]
  # The rows rehearse's first step draws: dream rows, then replay rows.
  host_rng = np.random.default_rng(0)
  steps, size = CFG.rehearse_steps, CFG.rehearse_batch_size
  tokens, masks = (x[0] for x in dream_sft._batches(rows, mask, steps, size,
                                                    host_rng))
  r_tokens, r_mask = (x[0] for x in dream_sft._batches(
      replay['tokens'], replay['mask'], steps, size, host_rng))
  sft = float(dream_sft.sft_loss(model, params, state, tokens, masks))
  logits = lambda p, s: model.apply({'params': p, **s}, r_tokens)
  kl = np_forward_kl(logits(params, state), logits(*anchor), r_mask)
  assert kl > 1e-3
  np.testing.assert_allclose(first_loss(anchor),
                             sft + CFG.rehearse_replay * kl, rtol=1e-4)
  np.testing.assert_allclose(first_loss(None), sft, rtol=1e-5)


def test_rehearsal_of_zero_steps_returns_the_params():
  model, params, state, slot = make_model()
  tokens, lengths = random_rows(3, 8, seed=2)
  rows, mask = dream_sft.dream_rows(tokens[:, 1:], lengths - 1, bos_id=BOS,
                                   pad_id=PAD)
  after, losses = dream_sft.rehearse(
      model, dataclasses.replace(CFG, rehearse_steps=0), params, state,
      np.asarray(rows), np.asarray(mask), level=1, slots=[slot],
      host_rng=np.random.default_rng(0))
  assert after is params and losses.shape == (0,)
