"""CMS levels (docs/design.md §2-3): config, masked experts, the level's math,
random experts, pretrained backbones. Growing and resetting experts:
test_growth.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import growth
from sleep_jax import sampling
from sleep_jax.models import CMSLevel, Transformer, TransformerConfig
from sleep_jax.models import count_params, variables
from cms_setup import BASE, LEVELS, fill_slots, loss, make


@pytest.mark.parametrize('levels,key,match', [
    ([dict(chunk_size=2), dict(chunk_size=3)], 'cms_levels[1].chunk_size=3',
     'not a multiple'),
    ([dict(rank=48)], 'cms_levels[0].rank=48', 'smaller than the level width'),
    ([dict(width=16, rank=16)], 'cms_levels[0].rank=16', 'rank < width'),
    ([dict(num_experts=0)], 'cms_levels[0].num_experts=0', '>= 1'),
    ([dict(num_experts=2, top_k=4)], 'cms_levels[0].top_k=4', 'larger than'),
    ([dict(chunk_size=0), dict(chunk_size=4)], 'cms_levels[0].chunk_size=0',
     'trailing'),
    ([dict(optimizer='lion')], "cms_levels[0].optimizer='lion'", 'valid'),
    ([dict(gate_bias=float('nan'))], 'cms_levels[0].gate_bias=nan', 'finite'),
    ([dict(chunk=2)], 'model.cms_levels[0].chunk', 'Unknown'),
    ([], 'model.cms_levels=()', 'at least one'),
])
def test_invalid_level_configs_fail_before_compiling(levels, key, match,
                                                     compile_counter):
  with compile_counter() as compiles:
    with pytest.raises(ValueError, match=match) as err:
      TransformerConfig.from_dict({**BASE, 'cms_levels': levels})
  assert key in str(err.value)
  assert compiles() == 0


def test_cms_levels_need_mlp_cms():
  with pytest.raises(ValueError, match="mlp='swiglu'"):
    TransformerConfig.from_dict({**BASE, 'mlp': 'swiglu',
                                 'cms_levels': [dict()]})


def test_param_count_and_logical_axes():
  model, params, state, tokens = make(LEVELS)
  assert count_params(params) == model.config.num_params()
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  level = boxed['layers_0']['mlp']['level_0']
  assert level['lowrank_a'].names == ('expert', 'embed', 'rank')
  assert level['lowrank_b'].names == ('expert', 'rank', 'embed')
  assert level['router'].names == ('embed', 'expert')
  assert level['dense']['gate_kernel'].names == ('embed', 'mlp')
  assert level['dense']['gate_kernel'].value.shape == (32, 16)
  assert boxed['layers_0']['mlp']['level_1']['dense'][
      'gate_kernel'].value.shape == (32, 48)  # width None -> d_ff
  assert jax.tree.map(np.shape, state) == {'cms': {'level_0': (3,),
                                                   'level_1': (2,)}}


def test_level_params_select_and_swap_one_level_in_every_layer():
  from sleep_jax.models import cms
  _, params, _, _ = make(LEVELS)
  tree = cms.level_params(params, 1)
  assert sorted(tree) == ['layers_0', 'layers_1']
  for layer, sub in tree.items():
    assert list(sub) == ['mlp'] and list(sub['mlp']) == ['level_1']
    assert sub['mlp']['level_1'] is params[layer]['mlp']['level_1']
  doubled = jax.tree.map(lambda x: 2 * x, tree)
  out = cms.with_level_params(params, doubled)
  for layer in tree:
    assert out[layer]['mlp']['level_1'] is doubled[layer]['mlp']['level_1']
    assert out[layer]['mlp']['level_0'] is params[layer]['mlp']['level_0']
    assert out[layer]['attn'] is params[layer]['attn']
    # `params` itself is left as it was.
    assert params[layer]['mlp']['level_1'] is tree[layer]['mlp']['level_1']
  assert out['embed'] is params['embed']


def test_cms_model_needs_its_state():
  model, params, _, tokens = make(LEVELS)
  with pytest.raises(ValueError, match="'cms': state"):
    model.apply({'params': params}, tokens)


def test_one_level_with_no_experts_is_the_plain_mlp_block():
  plain = TransformerConfig.from_dict({**BASE, 'mlp': 'swiglu'})
  tokens = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
  p_plain = Transformer(plain).init(jax.random.key(1), tokens)['params']
  model, params, state, _ = make([dict(num_experts=2, rank=4)])
  for i in range(2):
    params[f'layers_{i}'] = {
        **p_plain[f'layers_{i}'],
        'mlp': {'level_0': {**params[f'layers_{i}']['mlp']['level_0'],
                            'dense': p_plain[f'layers_{i}']['mlp']}}}
  for name in ('embed', 'final_norm'):
    params[name] = p_plain[name]
  want = Transformer(plain).apply({'params': p_plain}, tokens)
  got = model.apply(variables(params, state), tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_inactive_experts_get_exactly_zero_gradient():
  model, params, state, tokens = make(LEVELS)
  params, state, _ = growth.grow(params, state, 0, jax.random.key(1))
  params, state, _ = growth.grow(params, state, 0, jax.random.key(2))
  # Non-zero values everywhere, so zero gradients come from the mask alone.
  params = fill_slots(fill_slots(params, 0, 5), 1, 6)
  grads = jax.grad(loss, argnums=1)(model, params, state, tokens)
  for layer in ('layers_0', 'layers_1'):
    g0 = grads[layer]['mlp']['level_0']
    assert np.all(np.asarray(g0['lowrank_a'][2]) == 0)      # inactive
    assert np.all(np.asarray(g0['lowrank_b'][2]) == 0)
    assert np.all(np.asarray(g0['router'][:, 2]) == 0)
    assert np.any(np.asarray(g0['lowrank_b'][0]))           # active
    assert np.any(np.asarray(g0['router'][:, 1]))
    g1 = grads[layer]['mlp']['level_1']
    for name in ('lowrank_a', 'lowrank_b', 'router'):
      assert not np.any(np.asarray(g1[name]))               # none active


def _np_level(x, dense, a, b, router, active, top_k, gate_bias=0.0):
  """Numpy reference of one CMS level (docs/design.md §3, our reading)."""
  silu = lambda v: v / (1 + np.exp(-v))
  y = (silu(x @ dense['gate_kernel']) * (x @ dense['up_kernel'])) @ dense[
      'down_kernel']
  logits = x @ router
  for t in range(x.shape[0]):
    order = [e for e in np.argsort(-logits[t], kind='stable') if active[e]]
    for e in order[:top_k - 1]:
      gate = 1 / (1 + np.exp(-(logits[t, e] + gate_bias)))
      y[t] += gate * (silu(x[t] @ a[e]) @ b[e])
  return y


@pytest.mark.parametrize('top_k,active,gate_bias', [
    (2, [1, 1, 1, 0], 0.0), (3, [1, 0, 1, 1], 0.0), (5, [0, 1, 1, 0], 0.0),
    (1, [1, 1, 1, 1], 0.0), (3, [1, 0, 1, 1], -3.0), (5, [1, 1, 1, 1], 2.5)])
def test_level_matches_numpy_reference(top_k, active, gate_bias):
  from sleep_jax.models.cms import CMSLevelMoE
  config = TransformerConfig.from_dict(
      {**BASE, 'cms_levels': [dict(num_experts=4, rank=4, top_k=top_k,
                                   gate_bias=gate_bias)]})
  level = CMSLevelMoE(config, config.cms_levels[0])
  rng = np.random.default_rng(top_k)
  x = rng.normal(size=(1, 7, 32)).astype(np.float32)
  active = jnp.asarray(active, jnp.bool_)
  params = nn.meta.unbox(level.init(jax.random.key(0), x, active))['params']
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.4, jnp.float32),
      params)
  got = level.apply({'params': params}, x, active)
  np_params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  want = _np_level(x[0].astype(np.float64), np_params['dense'],
                   np_params['lowrank_a'], np_params['lowrank_b'],
                   np_params['router'], np.asarray(active), top_k, gate_bias)
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)


def test_random_expert_adds_one_active_expert_per_token():
  levels = [dict(num_experts=3, rank=4, top_k=1, width=16)]  # dense only
  model, params, state, tokens = make(levels)
  params, state, slot = growth.grow(params, state, 0, jax.random.key(3))
  params = fill_slots(params, 0, 9)
  dense_only = model.apply(variables(params, state), tokens)
  injected = model.apply(variables(params, state), tokens, random_expert=True,
                         rngs={'random_expert': jax.random.key(0)})
  # With one active expert the random pick is always it: the same as a
  # model whose top-k admits it.
  with_it = Transformer(TransformerConfig.from_dict(
      {**BASE, 'cms_levels': [dict(levels[0], top_k=2)]}))
  want = with_it.apply(variables(params, state), tokens)
  np.testing.assert_allclose(np.asarray(injected), np.asarray(want),
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(injected - dense_only))) > 1e-3
  out = sampling.sample(model, params, tokens[:, :4], np.array([4, 3]),
                        max_new_tokens=3, rng=jax.random.key(1),
                        model_state=state, random_expert=True)
  assert out.tokens.shape == (2, 3)
  plain = TransformerConfig.from_dict({**BASE, 'mlp': 'swiglu'})
  with pytest.raises(ValueError, match='CMS model'):
    sampling.sample(Transformer(plain), {}, tokens[:, :4], np.array([4, 3]),
                    max_new_tokens=3, rng=jax.random.key(1),
                    random_expert=True)


def test_cms_level_validate_standalone():
  with pytest.raises(ValueError, match='x.top_k=0'):
    CMSLevel(top_k=0).validate('x')


def test_pretrained_backbone_mode_keeps_logits_and_trains_fast_levels():
  import pathlib
  from sleep_jax import wake
  from sleep_jax.checkpoints import load_hf_checkpoint
  from sleep_jax.models import cms
  path = pathlib.Path(__file__).parent / 'testdata' / 'hf_llama'
  config, params = load_hf_checkpoint(path)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, config.vocab_size, (2, 9)), jnp.int32)
  want = Transformer(config).apply({'params': params}, tokens)
  fast = [CMSLevel(chunk_size=1, width=64, num_experts=2, rank=4,
                   optimizer='sgd', learning_rate=0.1)]
  slow = CMSLevel(chunk_size=0, num_experts=2, rank=4)
  cms_config, cms_params, state = cms.add_fast_levels(
      config, params, fast, slow, jax.random.key(0))
  assert cms_config.cms_levels[-1].width is None
  model = Transformer(cms_config)
  got = model.apply(variables(cms_params, state), tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Active parameters: the backbone plus the small fast levels only.
  fast_dense = config.num_layers * 3 * config.d_model * 64
  assert cms.active_param_count(cms_config, state) == (
      config.num_params() + fast_dense)
  backbone = jax.tree.map(np.asarray, cms_params['layers_0']['mlp']['level_1'])
  ws = wake.init_wake_state(cms_config, cms_params, state)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'mask': jnp.ones((2, 8), jnp.float32)}
  for _ in range(3):
    ws, _ = jax.jit(lambda s, b: wake.wake_step(model, s, b, False))(ws, batch)
  jax.tree.map(np.testing.assert_array_equal, backbone,
               jax.tree.map(np.asarray, ws.params['layers_0']['mlp']['level_1']))
  moved = ws.params['layers_0']['mlp']['level_0']['dense']['down_kernel']
  assert float(jnp.max(jnp.abs(moved))) > 0  # the fast level learned
  with pytest.raises(ValueError, match='plain backbone'):
    cms.add_fast_levels(cms_config, cms_params, fast, slow, jax.random.key(0))
