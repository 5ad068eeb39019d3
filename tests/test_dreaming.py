"""Dreaming (docs/design.md §5): isolated evaluation, selection, rehearsal."""

import dataclasses
import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax import growth
from sleep_jax import sampling
from sleep_jax.models import Transformer, TransformerConfig
from sleep_jax.models import lora
from sleep_jax.sequences import join
from test_seeding import teacher_with_fast_knowledge  # another model

BOS, EOS, PAD = 1, 2, 0
V, D = 37, 32


def make_model(tie_embeddings=True):
  levels = [dict(chunk_size=1, width=16, num_experts=4, rank=4, top_k=2,
                 learning_rate=0.01, optimizer='adam'),
            dict(chunk_size=0, width=32, num_experts=4, rank=4, top_k=2,
                 learning_rate=0.0, optimizer='adam')]
  config = TransformerConfig.from_dict(dict(
      vocab_size=V, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2,
      d_ff=48, max_len=64, mlp='cms', cms_levels=levels,
      tie_embeddings=tie_embeddings))
  model = Transformer(config)
  var = dict(nn.meta.unbox(model.init(jax.random.key(0),
                                      jnp.zeros((2, 8), jnp.int32))))
  params = var.pop('params')
  params, var, slot = growth.grow(params, var, 1, jax.random.key(1))
  return model, params, var, slot


CFG = dreaming.DreamingConfig(
    num_dreams=4, max_new_tokens=6, keep_top=1, keep_random=1, eval_steps=3,
    eval_learning_rate=0.05, rounds=1, rest_steps=2, rest_batch_size=2,
    rehearse_steps=3, rehearse_batch_size=2, lora_rank=2, tau='answer_logprob')


def random_rows(n, width, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (n, width)).astype(np.int32)
  tokens[:, 0] = BOS
  lengths = rng.integers(4, width + 1, n).astype(np.int32)
  for i, length in enumerate(lengths):
    tokens[i, length:] = PAD
  return tokens, lengths


def items_about(dreams, lengths, n_items, seed):
  """Per row: item 0 asks for the dream's tokens (a prefix of it as prompt,
  the rest as answer); the others are random."""
  rng = np.random.default_rng(seed)
  n, width = dreams.shape
  inputs = rng.integers(3, V, (n, n_items, width)).astype(np.int32)
  targets = rng.integers(3, V, (n, n_items, width)).astype(np.int32)
  answer = np.zeros((n, n_items, width), np.float32)
  answer[:, :, 2:4] = 1.0
  for i in range(n):
    row = np.concatenate([[BOS], dreams[i, :lengths[i]]])
    inputs[i, 0, :] = PAD
    targets[i, 0, :] = PAD
    answer[i, 0, :] = 0.0
    inputs[i, 0, :len(row) - 1] = row[:-1]
    targets[i, 0, :len(row) - 1] = row[1:]
    answer[i, 0, 1:len(row) - 1] = 1.0
  return {'inputs': inputs, 'targets': targets, 'answer_mask': answer}


def make_tasks(num_contexts=3, seed=0):
  prompts, lengths = random_rows(num_contexts, 10, seed)
  dreams, dlen = random_rows(num_contexts, 8, seed + 1)
  return dreaming.Tasks(prompts, lengths, prompts, lengths,
                        items_about(dreams[:, 1:], dlen - 1, 2, seed))


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


# ---------------------------------------------------------------- selection ---


def test_keep_is_top_k_plus_distinct_random_others():
  cfg = dataclasses.replace(CFG, num_dreams=7, keep_top=2, keep_random=3)
  rng = np.random.default_rng(0)
  seen_random = set()
  for trial in range(200):
    scores = rng.normal(size=(4, 7))
    kept = dreaming.keep(scores, 4, cfg, rng)
    assert kept.shape == (4, 5)
    for c in range(4):
      local = kept[c] - c * 7
      assert np.all((local >= 0) & (local < 7))
      assert len(set(local)) == 5, 'a dream was kept twice'
      top = np.argsort(-scores[c])[:2]
      np.testing.assert_array_equal(local[:2], top)
      assert not set(local[2:]) & set(top)
      seen_random.update((c, int(x)) for x in local[2:])
  # Every non-top dream can be drawn as a random extra.
  assert len({x for _, x in seen_random}) == 7
  random_cfg = dataclasses.replace(cfg, selection='random')
  kept = dreaming.keep(None, 4, random_cfg, rng)
  assert all(len(set(row)) == 5 for row in kept)


def test_repeated_dreams_are_kept_only_when_too_few_are_distinct():
  dreams = np.array([[5, 6, 7], [5, 6, 9], [5, 6, 7], [8, 8, 8],    # context 0
                     [4, 4, 4], [4, 4, 4], [4, 4, 4], [3, 4, 5]])   # context 1
  # Dream 1 = [5, 6] = dream 0's prefix.
  lengths = np.array([3, 2, 3, 3, 3, 3, 2, 3])
  dup = dreaming.duplicates(dreams, lengths, 4)
  np.testing.assert_array_equal(
      dup, [[False, False, True, False], [False, True, False, False]])
  cfg = dataclasses.replace(CFG, num_dreams=4, keep_top=1, keep_random=2)
  rng = np.random.default_rng(0)
  # Dream 2 of context 0 repeats dream 0 and has the best score: passed over.
  scores = np.array([[0.5, 0.1, 0.9, 0.2], [0.3, 0.9, 0.8, 0.1]])
  for _ in range(20):
    kept = dreaming.keep(scores, 2, cfg, rng, dup)
    assert kept[0, 0] == 0 and set(kept[0]) == {0, 1, 3}
    # Context 1 has 3 distinct texts (4 4 4 twice, 4 4, 3 4 5): all kept.
    assert kept[1, 0] == 4 + 2 and set(kept[1]) == {4, 6, 7}
    rand = dreaming.keep(None, 2, dataclasses.replace(cfg, selection='random'),
                         rng, dup)
    assert set(rand[0]) == {0, 1, 3} and set(rand[1]) == {4, 6, 7}
  # Fewer distinct dreams than k+b: repeats fill the rest, never twice.
  cfg4 = dataclasses.replace(cfg, keep_top=2, keep_random=2)
  kept = dreaming.keep(scores, 2, cfg4, rng, dup)
  assert [sorted(row) for row in kept] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_select_keeps_the_dream_that_moves_the_model_like_its_context():
  """Each context has one dream that is its own text (cosine 1 with the
  context's gradient) and one that is the other context's text; selection
  must pair dreams with their own context and keep the highest score."""
  model, params, state, _ = make_model()
  ctx, ctx_len = random_rows(2, 10, seed=11)
  ctx_len[:] = 10
  ctx[:, 1:] = np.random.default_rng(12).integers(3, V, (2, 9))
  noise, noise_len = random_rows(8, 10, seed=13)
  dreams, lengths = noise[:, 1:].copy(), noise_len - 1
  own = {1: 0, 4: 1}     # global dream index -> the context it copies
  other = {3: 1, 6: 0}   # copies of the *other* context
  for i, c in {**own, **other}.items():
    dreams[i], lengths[i] = ctx[c, 1:], ctx_len[c] - 1
  tasks = dreaming.Tasks(ctx, ctx_len, ctx, ctx_len,
                         items_about(ctx[:, 1:], ctx_len - 1, 2, seed=0))
  cfg = dataclasses.replace(CFG, num_dreams=4, keep_top=1, keep_random=1)
  data = dreaming.copy_data(tasks, cfg, dreams, lengths, np.arange(8) // 4,
                            np.random.default_rng(0), bos_id=BOS, pad_id=PAD)
  kept, scores = dreaming.select(model, params, state, tasks, data, cfg,
                                 jax.random.key(0), np.random.default_rng(0))
  np.testing.assert_allclose(scores[[1, 4]], 1.0, atol=1e-5)
  assert np.all(scores[[0, 2, 3]] < 0.999) and np.all(scores[[5, 6, 7]] < 0.999)
  assert kept[0] == 1 and kept[2] == 4, kept
  assert len(set(kept.tolist())) == 4 and set(kept[:2]) <= {0, 1, 2, 3}
  # A repeat of the best dream is passed over for the next best.
  dreams[2], lengths[2] = dreams[1], lengths[1]
  data = dreaming.copy_data(tasks, cfg, dreams, lengths, np.arange(8) // 4,
                            np.random.default_rng(0), bos_id=BOS, pad_id=PAD)
  top2 = dataclasses.replace(cfg, keep_top=2, keep_random=0)
  kept, scores = dreaming.select(model, params, state, tasks, data, top2,
                                 jax.random.key(0), np.random.default_rng(0),
                                 dreaming.duplicates(dreams, lengths, 4))
  assert scores[2] == scores[1]
  assert kept[0] == 1 and kept[1] == np.argmax(scores[[0, 3]]) * 3, kept


@functools.partial(jax.jit, static_argnums=0)
def _full_grad(model, params, state, tokens_L, mask_L):
  """The SFT loss's gradient with respect to every params leaf."""
  return jax.grad(lambda p: dream_sft.sft_loss(
      model, p, state, tokens_L[None], mask_L[None]))(params)


def flat_adapter_grad_reference(model, params, state, cfg, adapter, tokens, mask):
  """The LoRA gradient from the full kernel gradient: at b = 0, dL/db =
  scale * a^T dL/dW and dL/da = 0 (flattened like dreaming._flat)."""
  full = traverse_util.flatten_dict(
      _full_grad(model, params, state, tokens, mask), sep='/')
  parts = []
  for name in sorted(adapter):
    a = np.asarray(adapter[name]['a'], np.float64)
    dw = np.asarray(full[name], np.float64).reshape(a.shape[0], -1)
    parts += [np.zeros(a.size), (cfg.lora.scale * a.T @ dw).ravel()]
  return np.concatenate(parts)


@pytest.mark.parametrize('score', ['cosine', 'norm'])
def test_gradient_scores_match_the_projected_full_gradient(score):
  model, params, state, _ = make_model()
  cfg = dataclasses.replace(CFG, score=score)
  tokens, lengths = random_rows(6, 9, seed=7)
  masks = np.asarray(dream_sft.dream_rows(tokens[:, 1:], lengths - 1,
                                         bos_id=BOS, pad_id=PAD)[1])
  rows = np.asarray(dream_sft.dream_rows(tokens[:, 1:], lengths - 1,
                                        bos_id=BOS, pad_id=PAD)[0])
  ctx, ctx_len = random_rows(2, 9, seed=8)
  ctx_mask = (np.arange(9)[None] < ctx_len[:, None] - 1).astype(np.float32)
  index = np.array([0, 0, 0, 1, 1, 1])
  rng = jax.random.key(9)
  got = dreaming.gradient_scores(model, cfg, params, state, rng, rows, masks,
                                 ctx, ctx_mask, index)
  adapter = lora.init(params, cfg.lora, rng)
  ref = lambda t, m: flat_adapter_grad_reference(model, params, state, cfg,
                                                 adapter, t, m)
  g_ctx = [ref(ctx[c], ctx_mask[c]) for c in range(2)]
  for i in range(6):
    g = ref(rows[i], masks[i])
    want = (np.linalg.norm(g) if score == 'norm' else
            g @ g_ctx[index[i]] / (np.linalg.norm(g) * np.linalg.norm(g_ctx[index[i]])))
    np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=1e-6)


def _shapes(jaxpr):
  """Every intermediate's shape in a jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _shapes(sub)
  return out


def test_selection_never_forms_full_model_gradients():
  model, params, state, _ = make_model(tie_embeddings=False)
  assert params['lm_head'].shape == (D, V)
  tokens, lengths = random_rows(4, 9, seed=1)
  masks = np.ones((4, 9), np.float32)
  args = (params, state, jax.random.key(0), tokens, masks, tokens[:2],
          masks[:2], np.array([0, 0, 1, 1]))
  jaxpr = jax.make_jaxpr(
      lambda *a: dreaming.gradient_scores.__wrapped__(model, CFG, *a))(*args)
  head_grad = lambda s: len(s) >= 2 and s[-2:] == (D, V)
  assert not any(map(head_grad, _shapes(jaxpr.jaxpr)))
  # Nor any adapted kernel's: only its LoRA factors get gradients.
  kernels = {shape for shape, _ in lora.targets(params, CFG.lora).values()}
  kernel_sized = lambda s: any(s[-len(k):] == k for k in kernels)
  assert not any(map(kernel_sized, _shapes(jaxpr.jaxpr)))
  # The detectors work: a full-params gradient forms both.
  full = jax.make_jaxpr(jax.grad(lambda p: dream_sft.sft_loss(
      model, p, state, tokens, masks)))(params)
  assert any(map(head_grad, _shapes(full.jaxpr)))
  assert any(map(kernel_sized, _shapes(full.jaxpr)))


# ----------------------------------------------------- rehearsal, the stage ---


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
  anchor = teacher_with_fast_knowledge(None, params, state)
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


def test_dream_hands_its_anchor_to_replay_and_rehearsal(monkeypatch):
  """dream(anchor=) reaches both the replay sampler and rehearsal's KL
  teacher (the two tests above check what each does with it)."""
  model, params, state, slot = make_model()
  accepted = {'tokens': np.ones((2, 7), np.int32),
              'mask': np.ones((2, 7), np.float32)}
  monkeypatch.setattr(dreaming, 'rest_em',
                      lambda *args, **kwargs: (None, [], accepted))
  seen = {}

  def fake_replay(*args, anchor=None, **kwargs):
    seen['replay'] = anchor
    return accepted

  def fake_rehearse(model, cfg, params, *args, replay=None, anchor=None,
                    **kwargs):
    seen['rehearse'] = (replay, anchor)
    return params, np.zeros((cfg.rehearse_steps,), np.float32)
  monkeypatch.setattr(dreaming, 'self_replay', fake_replay)
  monkeypatch.setattr(dreaming, 'rehearse', fake_rehearse)
  pre_wake = teacher_with_fast_knowledge(None, params, state)
  for anchor in (pre_wake, None):
    dreaming.dream(model, CFG, params, state, make_tasks(), jax.random.key(0),
                   level=1, slots=[slot], bos_id=BOS, eos_id=EOS, pad_id=PAD,
                   anchor=anchor)
    assert seen['replay'] is anchor
    assert seen['rehearse'][0] is accepted and seen['rehearse'][1] is anchor


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


def test_rest_em_m_step_trains_the_generator_that_generate_uses():
  """The M-step on (prompt, dream) rows makes that dream likelier under the
  dream LoRA, and greedy dreaming with the LoRA then produces it."""
  model, params, state, _ = make_model()
  tasks = make_tasks(num_contexts=3, seed=5)
  cfg = dataclasses.replace(CFG, temperature=0.0, max_new_tokens=6,
                            rest_steps=40, rest_batch_size=3,
                            rest_learning_rate=0.01, lora_rank=4)
  targets = np.tile(np.arange(5, 11, dtype=np.int32), (3, 1))  # one dream
  rows, masks = join(tasks.prompts, tasks.prompt_lengths, targets,
                     np.full(3, 6, np.int32), pad_id=PAD)
  rows, masks = np.asarray(rows), np.asarray(masks)
  # The loss covers the dream tokens only.
  np.testing.assert_array_equal(masks.sum(1), 6)
  fresh = lora.init(params, cfg.lora, jax.random.key(2))
  trained, last_loss = dream_sft.train_generator(
      model, cfg, params, state, fresh, rows, masks, np.random.default_rng(0))
  loss = lambda g: float(dream_sft.sft_loss(model, params, state, rows, masks,
                                            g, cfg))
  assert loss(trained) < 0.25 * loss(fresh) and np.isfinite(last_loss)

  def agreement(generator):
    dreams, _ = dreaming.generate(model, params, state, generator, tasks, cfg,
                                  jax.random.key(0), eos_id=EOS, pad_id=PAD)
    return np.mean(np.asarray(dreams)[::cfg.num_dreams] == targets)
  assert agreement(trained) == 1.0 and agreement(None) < 0.5


def run_stage(model, params, state, slot, tasks, cfg=CFG, seed=0):
  return dreaming.dream(model, cfg, params, state, tasks, jax.random.key(seed),
                        level=1, slots=[slot], bos_id=BOS, eos_id=EOS,
                        pad_id=PAD, seed=seed)


def test_the_stage_runs_and_compiles_once_across_sleep_cycles(compile_counter):
  model, params, state, slot = make_model()
  first = run_stage(model, params, state, slot, make_tasks(seed=1), seed=1)
  assert [r['round'] for r in first.rounds] == [0, 1]
  assert all(r['kept'] == 3 * 2 for r in first.rounds)
  # Round 0 rewarded some dreams, so the generator's M-step ran too.
  assert first.rounds[0]['rewarded'] > 0 and 'generator_loss' in first.rounds[0]
  assert len(first.accepted['tokens']) > 0
  with compile_counter() as compiles:
    second = run_stage(model, first.params, state, slot, make_tasks(seed=3),
                       seed=3)
  assert compiles() == 0, f'{compiles()} compilations in the second cycle'
  assert len(second.rounds) == 2 and second.rounds[0]['rewarded'] > 0


def test_ablation_switches():
  model, params, state, slot = make_model()
  tasks = make_tasks()
  off = run_stage(model, params, state, slot, tasks,
                  dataclasses.replace(CFG, enabled=False))
  assert off.rounds == [] and off.params is params
  assert len(off.accepted['tokens']) == len(off.accepted['mask']) == 0
  dreams, lengths = dreaming.generate(model, params, state, None, tasks, CFG,
                                      jax.random.key(4), eos_id=EOS, pad_id=PAD)
  random_cfg = dataclasses.replace(CFG, selection='random')
  data = dreaming.copy_data(tasks, random_cfg, np.asarray(dreams),
                            np.asarray(lengths), np.arange(12) // 4,
                            np.random.default_rng(0), bos_id=BOS, pad_id=PAD)
  kept, scores = dreaming.select(model, params, state, tasks, data, random_cfg,
                                 jax.random.key(0), np.random.default_rng(0))
  assert scores is None and len(set(kept.tolist())) == len(kept) == 6
  for random_expert in (True, False):
    cfg = dataclasses.replace(CFG, random_expert=random_expert)
    got = dreaming.generate(model, params, state, None, tasks, cfg,
                            jax.random.key(4), eos_id=EOS, pad_id=PAD)
    want = sampling.sample(
        model, params, np.repeat(tasks.prompts, 4, 0),
        np.repeat(tasks.prompt_lengths, 4, 0), max_new_tokens=6,
        rng=jax.random.key(4), temperature=1.0, eos_id=EOS, pad_id=PAD,
        model_state=state, random_expert=random_expert)
    np.testing.assert_array_equal(got[0], want.tokens)


def test_random_expert_injection_changes_the_dreams():
  """Three trained experts in level 0 (top-1 routing): greedy dreams differ
  with the switch on; with the experts at zero (the base model's) they
  cannot."""
  model, params, state, _ = make_model()
  state = {'cms': {**state['cms'],
                   'level_0': jnp.array([True, True, True, False])}}
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(params, sep='/')
  flat = {k: (jnp.asarray(0.5 * rng.normal(size=v.shape), v.dtype)
              if 'level_0/lowrank' in k or 'level_0/router' in k else v)
          for k, v in flat.items()}
  trained = traverse_util.unflatten_dict(flat, sep='/')
  tasks = make_tasks(num_contexts=4)
  greedy = dataclasses.replace(CFG, temperature=0.0, max_new_tokens=8)

  def dreams(p, random_expert):
    cfg = dataclasses.replace(greedy, random_expert=random_expert)
    return np.asarray(dreaming.generate(model, p, state, None, tasks, cfg,
                                        jax.random.key(4), eos_id=EOS,
                                        pad_id=PAD)[0])
  assert not np.array_equal(dreams(trained, True), dreams(trained, False))
  np.testing.assert_array_equal(dreams(params, True), dreams(params, False))


@pytest.mark.parametrize('overrides, message', [
    (dict(keep_top=3, keep_random=2, num_dreams=4), 'dreaming.keep_top=3'),
    (dict(template='poem'), 'dreaming.template'),
    (dict(selection='best'), 'dreaming.selection'),
    (dict(tau='f1'), 'dreaming.tau'),
    (dict(rounds=-1), 'dreaming.rounds=-1'),
    (dict(eval_steps=0), 'dreaming.eval_steps=0'),
    (dict(lora_rank=0), 'dreaming.lora_rank=0'),
    (dict(temperature=-1.0), 'dreaming.temperature=-1.0'),
    (dict(rehearse_replay=-0.5), 'dreaming.rehearse_replay=-0.5'),
])
def test_bad_knobs_fail_at_config_time(overrides, message):
  with pytest.raises(ValueError, match=message):
    dreaming.DreamingConfig(**overrides)
  with pytest.raises(ValueError, match='unknown keys'):
    dreaming.DreamingConfig.from_dict({'num_dream': 3})
