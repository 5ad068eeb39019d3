"""The transformer: config checks, parameter counts, GQA, packing, RoPE."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.models import RopeScaling, Transformer, TransformerConfig
from sleep_jax.models import count_params, layers
from tiny_models import tiny_config


def _tiny(**overrides):
  return tiny_config(**{'vocab_size': 61, **overrides})


def _init(config, seed=0):
  boxed = Transformer(config).init(jax.random.key(seed),
                                   jnp.ones((1, 4), jnp.int32))
  return boxed, nn.meta.unbox(boxed)['params']


# Llama-3-8B's published shape; 8,030,261,248 is its well-known total
# parameter count (HF model card / `model.num_parameters()`).
LLAMA3_8B = dict(vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32,
                 num_kv_heads=8, d_ff=14_336, rope_theta=500_000.0,
                 rope_scaling=RopeScaling(), tie_embeddings=False,
                 dtype='bfloat16', max_len=8192)


def test_eval_shape_8b_uses_no_memory_and_counts_params():
  config = TransformerConfig(**LLAMA3_8B)
  model = Transformer(config)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = nn.meta.unbox(variables)['params']
  assert count_params(params) == 8_030_261_248
  assert config.num_params() == 8_030_261_248
  logits = jax.eval_shape(lambda p, t: model.apply({'params': p}, t), params,
                          tokens)
  assert logits.shape == (2, 16, 128_256) and logits.dtype == jnp.float32
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('overrides, key, hint', [
    (dict(num_heads=6, num_kv_heads=4), 'num_heads=6', 'num_kv_heads'),
    (dict(d_model=30, num_heads=4), 'd_model=30', '[1, 2, 3, 5, 6, 10, 15, 30]'),
    (dict(dtype='float16'), "dtype='float16'", 'bfloat16'),
    (dict(num_layers=0), 'num_layers=0', 'positive'),
    (dict(mlp='moe'), "mlp='moe'", 'swiglu'),
])
def test_invalid_config_names_key_value_and_fix(overrides, key, hint):
  with pytest.raises(ValueError) as err:
    _tiny(**overrides)
  assert key in str(err.value) and hint in str(err.value)


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match=r"model\.num_head'"):
    TransformerConfig.from_dict(dict(vocab_size=8, d_model=8, num_layers=1,
                                     num_heads=2, num_kv_heads=1, d_ff=8,
                                     num_head=3))


@pytest.mark.parametrize('overrides', [
    dict(), dict(qkv_bias=True), dict(qk_norm=True, head_dim=12),
    dict(tie_embeddings=False)])
def test_every_param_has_logical_axes_and_counts_match(overrides):
  config = _tiny(**overrides)
  boxed, params = _init(config)
  leaves = jax.tree.leaves(boxed['params'],
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  assert count_params(params) == config.num_params()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  has = lambda name: any(name in jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_leaves_with_path(params))
  assert has('q_bias') == config.qkv_bias
  assert has('q_norm') == config.qk_norm
  assert has('lm_head') == (not config.tie_embeddings)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = _tiny(num_heads=4, num_kv_heads=2)
  mha = _tiny(num_heads=4, num_kv_heads=4)
  _, p = _init(gqa)
  p_mha = jax.tree.map(lambda x: x, p)
  for i in range(gqa.num_layers):
    attn = p_mha[f'layers_{i}']['attn']
    for name in ('k_kernel', 'v_kernel'):
      # kv head j serves query heads 2j, 2j+1.
      attn[name] = jnp.repeat(attn[name], 2, axis=1)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 61)
  out_gqa = Transformer(gqa).apply({'params': p}, tokens)
  out_mha = Transformer(mha).apply({'params': p_mha}, tokens)
  np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
  config = _tiny()
  _, p = _init(config)
  a = jnp.array([[5, 6, 7, 8, 9, 10]])
  b = a.at[0, 4:].set(jnp.array([1, 2]))
  la = Transformer(config).apply({'params': p}, a)
  lb = Transformer(config).apply({'params': p}, b)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  assert not np.allclose(la[:, 4:], lb[:, 4:])


def test_packed_row_equals_documents_run_separately():
  config = _tiny()
  _, p = _init(config)
  model = Transformer(config)
  doc_a, doc_b = [3, 14, 15, 9, 2], [6, 5, 35]
  packed = jnp.array([doc_a + doc_b])
  positions = jnp.array([list(range(5)) + list(range(3))])
  segment_ids = jnp.array([[1] * 5 + [2] * 3])
  out = model.apply({'params': p}, packed, positions=positions,
                    segment_ids=segment_ids)
  alone_a = model.apply({'params': p}, jnp.array([doc_a]))
  alone_b = model.apply({'params': p}, jnp.array([doc_b]))
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], alone_b, atol=1e-5)


def _llama3_inv_freq_reference(head_dim, theta, factor, low, high, old_len):
  """Llama 3.1's frequency rule, written out per frequency in plain Python."""
  out = []
  for i in range(0, head_dim, 2):
    f = 1.0 / theta ** (i / head_dim)
    wavelen = 2 * math.pi / f
    if wavelen < old_len / high:
      out.append(f)
    elif wavelen > old_len / low:
      out.append(f / factor)
    else:
      s = (old_len / wavelen - low) / (high - low)
      out.append((1 - s) * f / factor + s * f)
  return np.array(out)


def test_llama3_rope_scaling_matches_reference_rule():
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=8192)
  ours = layers.rope_frequencies(128, 500_000.0, scaling)
  ref = _llama3_inv_freq_reference(128, 500_000.0, 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  plain = layers.rope_frequencies(128, 500_000.0, None)
  assert plain[0] == ours[0] and plain[-1] > ours[-1]  # only long waves scaled


def test_rope_is_relative():
  """q.k after RoPE depends only on the position difference."""
  inv_freq = layers.rope_frequencies(8, 10_000.0, None)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  def dot(pq, pk):
    rq = layers.apply_rope(q, jnp.array([[pq]]), inv_freq)
    rk = layers.apply_rope(k, jnp.array([[pk]]), inv_freq)
    return float(jnp.sum(rq * rk))
  assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
  assert dot(7, 3) != pytest.approx(dot(7, 5), abs=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config32 = _tiny()
  config16 = _tiny(dtype='bfloat16')
  _, p = _init(config32)
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 61)
  l32 = Transformer(config32).apply({'params': p}, tokens)
  l16 = Transformer(config16).apply({'params': p}, tokens)
  assert l16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1
  assert not np.array_equal(l16, l32)


def test_logit_index_returns_that_position_only():
  config = _tiny()
  _, p = _init(config)
  tokens = jax.random.randint(jax.random.key(3), (3, 6), 0, 61)
  full = Transformer(config).apply({'params': p}, tokens)
  index = jnp.array([5, 0, 2])
  picked = Transformer(config).apply({'params': p}, tokens, logit_index=index)
  assert picked.shape == (3, 1, 61)
  np.testing.assert_allclose(picked[:, 0], full[jnp.arange(3), index], atol=1e-6)
