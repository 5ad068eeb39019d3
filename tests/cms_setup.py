"""What the CMS and growth tests share: a CMS model on random tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import growth
from sleep_jax.models import variables
from tiny_models import tiny_cms_model

BASE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, d_ff=48, mlp='cms')
LEVELS = [dict(chunk_size=1, width=16, num_experts=3, rank=4, top_k=4),
          dict(chunk_size=2, width=None, num_experts=2, rank=4, top_k=3)]


def make(levels, **overrides):
  """(model, params, model_state, tokens [2, 10]) of a CMS model of BASE."""
  model, params, var = tiny_cms_model(**{**BASE, 'cms_levels': levels,
                                         **overrides})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 10)),
                       jnp.int32)
  return model, params, var, tokens


def fill_slots(params, level, value_seed):
  """Random values in every expert slot of `level` (active or not)."""
  rng = np.random.default_rng(value_seed)
  def fill(path, x):
    name = growth._level_leaf(path, level)
    if name in ('lowrank_a', 'lowrank_b', 'router'):
      return jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(fill, params)


def loss(model, params, state, tokens):
  """Mean next-token cross-entropy on `tokens`."""
  logits = model.apply(variables(params, state), tokens[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]))
