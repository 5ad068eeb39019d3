"""Dreaming's selection (sleep_jax.dreaming): top-k by gradient score plus
random others, duplicates last, LoRA-projected gradients only."""

import dataclasses
import functools
import math

from flax import traverse_util
import jax
import jax.extend
import numpy as np
import pytest

from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax.models import lora
from dreaming_setup import (BOS, CFG, D, PAD, V, items_about, make_model,
                            random_rows)


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


def _contraction_shapes(jaxpr):
  """The output shape of every contraction (dot_general) in a jaxpr,
  sub-jaxprs included: a weight gradient is formed by one."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out += [tuple(v.aval.shape) for v in eqn.outvars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _contraction_shapes(sub)
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
  # XLA may form a [in, out] gradient as its transpose [out, in].
  head_grad = lambda s: len(s) >= 2 and s[-2:] in ((D, V), (V, D))
  assert not any(map(head_grad, _contraction_shapes(jaxpr.jaxpr)))
  # Nor any adapted kernel's: only its LoRA factors get gradients. A kernel
  # may be contracted as itself or flattened to [inputs, outputs].
  kernels = set()
  for shape, input_ndim in lora.targets(params, CFG.lora).values():
    kernels.add(shape)
    flat = (math.prod(shape[:input_ndim]), math.prod(shape[input_ndim:]))
    kernels |= {flat, flat[::-1]}
  kernel_sized = lambda s: any(s[-len(k):] == k for k in kernels)
  assert not any(map(kernel_sized, _contraction_shapes(jaxpr.jaxpr)))
  # The detectors work: a full-params gradient forms both.
  full = jax.make_jaxpr(jax.grad(lambda p: dream_sft.sft_loss(
      model, p, state, tokens, masks)))(params)
  assert any(map(head_grad, _contraction_shapes(full.jaxpr)))
  assert any(map(kernel_sized, _contraction_shapes(full.jaxpr)))
