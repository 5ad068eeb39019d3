"""The suite's tiny Transformers, built one way (conftest.py has fixtures).

`tiny_cms_model()` is the two-level CMS model most method tests use: a fast
level (chunk 1) and a slow one (chunk 0), 4 expert slots each, no expert
active. `tiny_dense_model()` is the same backbone with the plain SwiGLU MLP.
Both take TransformerConfig fields as overrides; a test whose numbers depend
on another config passes that config here instead of building its own.
"""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from sleep_jax import growth
from sleep_jax.models import Transformer, TransformerConfig

BASE = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, d_ff=48, max_len=64)
FAST_LEVEL = dict(chunk_size=1, width=16, num_experts=4, rank=4, top_k=2,
                  learning_rate=0.01, optimizer='adam')
SLOW_LEVEL = dict(chunk_size=0, width=32, num_experts=4, rank=4, top_k=2,
                  learning_rate=0.0, optimizer='adam')


def tiny_config(**overrides) -> TransformerConfig:
  """BASE (a dense model) with `overrides` (any TransformerConfig field)."""
  return TransformerConfig.from_dict({**BASE, **overrides})


def tiny_cms_config(**overrides) -> TransformerConfig:
  """BASE with the CMS levels (FAST_LEVEL, SLOW_LEVEL), then `overrides`."""
  return tiny_config(**{'mlp': 'cms', 'cms_levels': [FAST_LEVEL, SLOW_LEVEL],
                        **overrides})


def init(config: TransformerConfig, seed: int = 0):
  """(model, params, model_state) of `config`, initialised from key `seed`.

  model_state is {} for a dense model, {'cms': the expert masks} for CMS.
  The params depend on the key only, not on the example input.
  """
  model = Transformer(config)
  variables = dict(nn.meta.unbox(model.init(jax.random.key(seed),
                                            jnp.zeros((2, 8), jnp.int32))))
  params = variables.pop('params')
  return model, params, variables


def tiny_cms_model(seed: int = 0, **overrides):
  """(model, params, model_state) of `tiny_cms_config(**overrides)`."""
  return init(tiny_cms_config(**overrides), seed)


def tiny_dense_model(seed: int = 0, **overrides):
  """(model, params, model_state={}) of `tiny_config(**overrides)`."""
  return init(tiny_config(**overrides), seed)


def teacher_with_fast_knowledge(params, state):
  """A level-0 expert grown and given B != 0, so it changes the function:
  what wake leaves for sleep to consolidate. Returns (params, state)."""
  params, state, slot = growth.grow(params, state, 0, jax.random.key(7))
  flat = traverse_util.flatten_dict(params, sep='/')
  for path in flat:
    if 'level_0/lowrank_b' in path:
      noise = jax.random.normal(jax.random.key(len(path)), flat[path].shape[1:])
      flat[path] = flat[path].at[slot].set(2.0 * noise)
  return traverse_util.unflatten_dict(flat, sep='/'), state
