"""Functional LoRA (sleep_jax.models.lora) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.models import lora
from tiny_models import tiny_cms_model


CFG = lora.LoraConfig(rank=3, alpha=6.0, targets=(
    (r'attn/q_kernel$', 1), (r'attn/o_kernel$', 2), (r'mlp/up_kernel$', 1)))


def random_adapter(params, cfg, seed=0):
  """An adapter with b != 0, so merging changes the kernels."""
  adapter = lora.init(params, cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return {k: {'a': v['a'], 'b': jnp.asarray(rng.normal(size=v['b'].shape),
                                            jnp.float32)}
          for k, v in adapter.items()}


def test_fresh_adapter_is_the_identity_and_targets_match(tiny_dense):
  _, params, _ = tiny_dense
  adapter = lora.init(params, CFG, jax.random.key(1))
  assert sorted(adapter) == sorted(
      f'layers_{i}/{k}' for i in range(2)
      for k in ('attn/q_kernel', 'attn/o_kernel', 'mlp/up_kernel'))
  # q_kernel [32, 4, 8]: in 32, out 32; o_kernel [4, 8, 32] with two input axes.
  assert adapter['layers_0/attn/q_kernel']['a'].shape == (32, 3)
  assert adapter['layers_0/attn/o_kernel']['a'].shape == (32, 3)
  assert adapter['layers_0/mlp/up_kernel']['b'].shape == (3, 48)
  merged = lora.merge(params, adapter, CFG)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_merge_matches_numpy_reference(tiny_dense):
  _, params, _ = tiny_dense
  adapter = random_adapter(params, CFG)
  merged = lora.merge(params, adapter, CFG)
  scale = 6.0 / 3
  for layer in range(2):
    for name, shape in (('attn/q_kernel', (32, 4, 8)), ('attn/o_kernel', (4, 8, 32)),
                        ('mlp/up_kernel', (32, 48))):
      key = f'layers_{layer}/{name}'
      w = np.asarray(params[f'layers_{layer}'][name.split('/')[0]][name.split('/')[1]])
      a = np.asarray(adapter[key]['a'], np.float64)
      b = np.asarray(adapter[key]['b'], np.float64)
      expected = w + scale * (a @ b).reshape(shape)
      got = merged[f'layers_{layer}'][name.split('/')[0]][name.split('/')[1]]
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Untargeted kernels are the very same arrays.
  assert merged['layers_0']['attn']['k_kernel'] is params['layers_0']['attn']['k_kernel']


def test_copies_are_independent_and_vmap_matches_one_by_one(tiny_dense):
  model, params, _ = tiny_dense
  batched = lora.init(params, CFG, jax.random.key(3), copies=4)
  assert batched['layers_1/attn/q_kernel']['a'].shape == (4, 32, 3)
  a = batched['layers_1/attn/q_kernel']['a']
  assert not np.allclose(a[0], a[1])
  batched = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), batched)
  tokens = jnp.asarray([[1, 5, 7, 9]])
  logits = lambda ad: model.apply({'params': lora.merge(params, ad, CFG)},
                                  tokens)
  together = jax.vmap(logits)(batched)
  for i in range(4):
    np.testing.assert_allclose(together[i], logits(lora.take(batched, i)),
                               rtol=1e-5, atol=1e-5)
  assert not np.allclose(together[0], together[1])


@pytest.mark.parametrize('kwargs, message', [
    (dict(rank=0), 'lora.rank=0'),
    (dict(alpha=0.0), 'lora.alpha=0.0'),
    (dict(targets=()), 'lora.targets is empty'),
    (dict(targets=(('attn/(q', 1),)), 'regex'),
    (dict(targets=(('attn/q_kernel', 0),)), 'input_ndim >= 1'),
])
def test_bad_configs_fail_with_the_key(kwargs, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    lora.LoraConfig(**kwargs)


def test_targets_that_match_nothing_or_leave_no_output_axis(tiny_dense):
  _, params, _ = tiny_dense
  with pytest.raises(ValueError, match='match no params leaf'):
    lora.init(params, lora.LoraConfig(targets=(('nope', 1),)), jax.random.key(0))
  with pytest.raises(ValueError, match='leaves no output axis'):
    lora.init(params, lora.LoraConfig(targets=(('mlp/up_kernel', 2),)),
              jax.random.key(0))


def test_unmerged_collection_equals_merging(tiny_dense):
  model, params, _ = tiny_dense
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=(
      (r'attn/(q|k|v)_kernel$', 1), (r'attn/o_kernel$', 2),
      (r'mlp/(gate|up|down)_kernel$', 1)))
  adapter = random_adapter(params, cfg, seed=4)
  tokens = jnp.asarray([[1, 5, 7, 9, 3], [2, 4, 6, 8, 10]])
  merged = model.apply({'params': lora.merge(params, adapter, cfg)}, tokens)
  collection = lora.as_collection(params, adapter, cfg)
  unmerged = model.apply({'params': params, 'lora': collection}, tokens)
  plain = model.apply({'params': params}, tokens)
  np.testing.assert_allclose(unmerged, merged, rtol=1e-4, atol=1e-4)
  assert not np.allclose(unmerged, plain, atol=1e-3)
  wrong = lora.LoraConfig(rank=3, targets=((r'attn/o_kernel$', 1),))
  with pytest.raises(ValueError, match='input_ndim=2'):
    lora.as_collection(params, lora.init(params, wrong, jax.random.key(0)),
                       wrong)


def test_misused_adapters_fail_with_the_fix_named(tiny_dense):
  model, params, _ = tiny_dense
  adapter = lora.init(params, CFG, jax.random.key(0))
  # An adapter of another model: the Transformer would skip the kernels.
  _, cms_params, _ = tiny_cms_model(cms_levels=[dict(
      chunk_size=0, width=48, num_experts=2, rank=4, top_k=1,
      learning_rate=0.0)])
  for apply in (lora.merge, lora.as_collection):
    with pytest.raises(ValueError, match=r"mlp/up_kernel'\] are not in params"):
      apply(cms_params, adapter, CFG)
    with pytest.raises(ValueError, match='leading copy axis'):
      apply(params, lora.init(params, CFG, jax.random.key(0), copies=3), CFG)
    with pytest.raises(ValueError, match='matches none of lora.targets'):
      only_q = lora.LoraConfig(rank=3, targets=(('q_kernel', 1),))
      apply(params, adapter, only_q)
  with pytest.raises(ValueError, match='regex string'):
    lora.LoraConfig(targets=((3, 1),))
  listed = lora.LoraConfig(targets=[['attn/q_kernel$', 1]])
  assert listed.targets == (('attn/q_kernel$', 1),) and hash(listed)
