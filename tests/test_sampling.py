"""The KV-cache sampler against full-recompute decoding and the forward pass."""

import re

import jax
import numpy as np
import pytest

from sleep_jax import sampling
from tiny_models import tiny_dense_model

MODEL, PARAMS, _ = tiny_dense_model(vocab_size=97, d_ff=64, qkv_bias=True)
CONFIG = MODEL.config
# Random models are nearly uniform; sharpen them so greedy paths are stable
# and distinct per row.
PARAMS = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, PARAMS)

LENGTHS = np.array([3, 9, 1, 6], np.int32)
WIDTH = 10


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  right = np.zeros((len(LENGTHS), WIDTH), np.int32)
  left = np.zeros_like(right)
  for i, n in enumerate(LENGTHS):
    toks = rng.integers(1, CONFIG.vocab_size, n)
    right[i, :n] = toks
    left[i, WIDTH - n:] = toks
  return right, left


def _greedy(prompts, side, use_cache, n=12, **kw):
  return sampling.sample(MODEL, PARAMS, prompts, LENGTHS, max_new_tokens=n,
                         rng=jax.random.key(0), padding_side=side,
                         use_cache=use_cache, **kw)


@pytest.mark.parametrize('side', ['right', 'left'])
def test_cached_greedy_equals_full_recompute(side):
  right, left = _prompts()
  prompts = right if side == 'right' else left
  cached = _greedy(prompts, side, use_cache=True)
  recompute = _greedy(prompts, side, use_cache=False)
  np.testing.assert_array_equal(cached.tokens, recompute.tokens)
  np.testing.assert_array_equal(cached.lengths, recompute.lengths)
  np.testing.assert_allclose(cached.logprobs, recompute.logprobs, atol=1e-5)
  # Rows do not all produce the same continuation (the test has teeth).
  assert len({tuple(r) for r in np.asarray(cached.tokens)}) > 1


def test_left_and_right_padding_give_the_same_tokens():
  right, left = _prompts(1)
  a = _greedy(right, 'right', True)
  b = _greedy(left, 'left', True)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_logprobs_match_forward_log_softmax():
  right, _ = _prompts(2)
  out = _greedy(right, 'right', True, n=8)
  for i, n in enumerate(LENGTHS):
    seq = np.concatenate([right[i, :n], np.asarray(out.tokens[i])])
    logp = jax.nn.log_softmax(MODEL.apply({'params': PARAMS}, seq[None]), -1)[0]
    expected = [logp[n - 1 + t, seq[n + t]] for t in range(8)]
    np.testing.assert_allclose(out.logprobs[i], expected, atol=1e-5)
    # Greedy picks the argmax of the forward pass at every step.
    np.testing.assert_array_equal(
        np.argmax(logp[n - 1:n + 7], -1), np.asarray(out.tokens[i]))


def test_rows_stop_at_eos_and_are_padded():
  right, _ = _prompts(3)
  free = _greedy(right, 'right', True, n=10)
  eos = int(free.tokens[1, 2])  # row 1 emits this at step 2
  out = _greedy(right, 'right', True, n=10, eos_id=eos, pad_id=-1)
  for i in range(len(LENGTHS)):
    row = np.asarray(free.tokens[i])
    hits = np.flatnonzero(row == eos)
    expected_len = hits[0] + 1 if hits.size else 10
    assert int(out.lengths[i]) == expected_len
    np.testing.assert_array_equal(out.tokens[i, :expected_len], row[:expected_len])
    assert np.all(np.asarray(out.tokens[i, expected_len:]) == -1)
    assert np.all(np.asarray(out.logprobs[i, expected_len:]) == 0.0)
  assert int(out.lengths[1]) == 3


def test_top_k_1_and_tiny_top_p_are_greedy():
  right, _ = _prompts(4)
  greedy = _greedy(right, 'right', True)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = sampling.sample(MODEL, PARAMS, right, LENGTHS, max_new_tokens=12,
                          rng=jax.random.key(5), temperature=1.0, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_sampling_is_seeded_and_respects_top_k():
  right, _ = _prompts(5)
  kw = dict(max_new_tokens=1, temperature=2.0, top_k=3)
  draws = [sampling.sample(MODEL, PARAMS, right, LENGTHS, rng=jax.random.key(s),
                           **kw).tokens[:, 0] for s in range(40)]
  again = sampling.sample(MODEL, PARAMS, right, LENGTHS, rng=jax.random.key(0),
                          **kw).tokens[:, 0]
  np.testing.assert_array_equal(draws[0], again)
  logits = MODEL.apply({'params': PARAMS}, right)
  for i, n in enumerate(LENGTHS):
    top3 = set(np.argsort(-np.asarray(logits[i, n - 1]))[:3].tolist())
    seen = {int(d[i]) for d in draws}
    assert seen <= top3 and len(seen) > 1


def test_cached_sampling_equals_recompute_sampling_with_same_rng():
  right, _ = _prompts(6)
  kw = dict(max_new_tokens=10, rng=jax.random.key(3), temperature=0.8,
            top_k=20, top_p=0.9)
  a = sampling.sample(MODEL, PARAMS, right, LENGTHS, **kw)
  b = sampling.sample(MODEL, PARAMS, right, LENGTHS, use_cache=False, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize('steps_per_check', [3, 8])
def test_blocks_of_steps_give_the_same_tokens(steps_per_check):
  """Checking the stop condition once per block (what a GPU gets by
  default) changes nothing: not the tokens after EOS, not a row's length,
  not the draws (10 steps, not a multiple of 3 or 8; with EOS, row 1
  stops after 3)."""
  right, _ = _prompts(3)
  free = _greedy(right, 'right', True, n=10)
  eos = int(free.tokens[1, 2])
  for kw in (dict(eos_id=eos, pad_id=-1), dict(temperature=0.9, top_k=20)):
    one, block = (sampling.sample(MODEL, PARAMS, right, LENGTHS,
                                  max_new_tokens=10, rng=jax.random.key(4),
                                  steps_per_check=k, **kw)
                  for k in (1, steps_per_check))
    for a, b in zip(one, block):
      np.testing.assert_array_equal(a, b)
  assert int(one.lengths.max()) == 10
  everyone_stops = dict(eos_id=eos, pad_id=-1, steps_per_check=steps_per_check)
  short = _greedy(right, 'right', True, n=10, **everyone_stops)
  assert int(short.lengths[1]) == 3


def test_a_block_of_steps_is_a_loop_of_known_trip_count():
  """XLA marks the inner loop with its trip count, which is what lets a
  GPU run it without copying the condition to the host each step."""
  right, _ = _prompts()
  lowered = sampling._sample_cached.lower(
      MODEL, {'params': PARAMS}, right, LENGTHS, jax.random.key(0),
      random_expert=False, max_new_tokens=12, temperature=0.0, top_k=0,
      top_p=1.0, eos_id=5, pad_id=0, padding_side='right', steps_per_check=4)
  loops = {}  # the decode's while loops by name: trip count or None
  for line in lowered.compile().as_text().splitlines():
    name = re.search(r'op_name="jit\(_sample_cached\)/(while(/body/while)?)"',
                     line)
    if ' while(' in line and name:
      count = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      loops[name.group(1)] = count and int(count.group(1))
  assert loops == {'while': None, 'while/body/while': 4}, loops
  with pytest.raises(ValueError, match='steps_per_check=0 must be >= 1'):
    sampling.sample(MODEL, PARAMS, right, LENGTHS, max_new_tokens=2,
                    rng=jax.random.key(0), steps_per_check=0)


def test_sampler_compiles_once_per_shape(compile_counter):
  right, _ = _prompts(7)
  sampling.sample(MODEL, PARAMS, right, LENGTHS, max_new_tokens=5,
                  rng=jax.random.key(0))
  before = sampling._sample_cached._cache_size()
  other_params = jax.tree.map(lambda x: x + 0.01, PARAMS)
  with compile_counter() as compiles:
    for seed in range(3):
      prompts, _ = _prompts(10 + seed)
      sampling.sample(MODEL, other_params, prompts, LENGTHS, max_new_tokens=5,
                      rng=jax.random.key(seed))
  assert sampling._sample_cached._cache_size() == before
  assert compiles() == 0


def test_bad_arguments_are_clear_errors():
  right, _ = _prompts()
  with pytest.raises(ValueError, match='top_p=1.5'):
    sampling.sample(MODEL, PARAMS, right, LENGTHS, max_new_tokens=2,
                    rng=jax.random.key(0), top_p=1.5)
  with pytest.raises(ValueError, match="padding_side='middle'"):
    sampling.sample(MODEL, PARAMS, right, LENGTHS, max_new_tokens=2,
                    rng=jax.random.key(0), padding_side='middle')
  with pytest.raises(ValueError, match=r'prompt_lengths must be in \[1, 10\]'):
    sampling.sample(MODEL, PARAMS, right, np.array([3, 11, 1, 6]),
                    max_new_tokens=2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='prompt_lengths must have shape'):
    sampling.sample(MODEL, PARAMS, right, LENGTHS[:2], max_new_tokens=2,
                    rng=jax.random.key(0))
