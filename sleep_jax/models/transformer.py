"""The llama/qwen-family decoder: `Transformer(config).apply({'params': p}, tokens)`.

Call modes:

* training / scoring: `apply(vars, tokens_BxL)` -> logits f32[B, L, V];
  optional `positions` and `segment_ids` (packed rows: tokens attend only
  within their segment).
* cached decoding: `apply(vars, tokens_BxL, positions=pos_BxL, cache=cache)`
  -> (logits, new_cache).
* CMS models (`config.mlp == 'cms'`) also need their expert masks:
  `apply({'params': p, 'cms': s}, ...)` (see `variables`); with
  `random_expert=True` and `rngs={'random_expert': key}` each CMS level adds
  one random active expert per token (dreaming).
* `logit_index=int[B]` returns logits [B, 1, V] for that position of each
  row only (prefill needs just the last prompt token). The cache (see `init_cache`) is a plain pytree
  passed in and out; slot s of the cache holds the token at absolute
  position s, and each query attends to the slots at or before its position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_jax.models import cms
from sleep_jax.models import layers
from sleep_jax.models.config import TransformerConfig


def variables(params, model_state=None) -> dict:
  """The `apply` variables: params plus the non-trained state collections."""
  return {'params': params, **(model_state or {})}


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache,
               cms_active=None, random_key=None):
    cfg = self.config
    h = layers.RMSNorm(cfg.norm_eps, 'embed', cfg.compute_dtype,
                       name='attn_norm')(x_BxLxD)
    attn_out, new_cache = layers.Attention(cfg, name='attn')(
        h, positions_BxL, segment_ids_BxL=segment_ids_BxL, cache=cache)
    x_BxLxD = x_BxLxD + attn_out
    h = layers.RMSNorm(cfg.norm_eps, 'embed', cfg.compute_dtype,
                       name='mlp_norm')(x_BxLxD)
    if cfg.mlp == 'cms':
      mlp_out = cms.CMSChain(cfg, name='mlp')(h, cms_active, random_key)
    else:
      mlp_out = layers.SwiGLU(cfg, name='mlp')(h)
    x_BxLxD = x_BxLxD + mlp_out
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))
    return x_BxLxD, new_cache


class Transformer(nn.Module):
  """Decoder-only LM. Params float32; compute in `config.dtype`."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, positions=None, segment_ids=None,
               cache=None, logit_index=None, random_expert=False):
    cfg = self.config
    cms_active, random_key = self._cms_inputs(random_expert)
    batch, length = tokens_BxL.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                   (batch, length))
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.d_model ** -0.5),
            ('vocab', 'embed')),
        param_dtype=jnp.float32, dtype=cfg.compute_dtype, name='embed')
    x_BxLxD = embed(tokens_BxL)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))

    block_cls = nn.remat(Block) if cfg.remat else Block
    new_cache = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache[i]
      layer_key = (None if random_key is None
                   else jax.random.fold_in(random_key, i))
      x_BxLxD, c = block_cls(cfg, name=f'layers_{i}')(
          x_BxLxD, positions, segment_ids, layer_cache, cms_active, layer_key)
      new_cache.append(c)

    if logit_index is not None:
      # Only one position per row needs logits (e.g. the last prompt token at
      # prefill): skip the [B, L, V] output projection.
      x_BxLxD = jnp.take_along_axis(x_BxLxD, logit_index[:, None, None], axis=1)
    x_BxLxD = layers.RMSNorm(cfg.norm_eps, 'embed', cfg.compute_dtype,
                             name='final_norm')(x_BxLxD)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      head = self.param(
          'lm_head',
          nn.with_logical_partitioning(
              nn.initializers.normal(stddev=cfg.d_model ** -0.5),
              ('embed', 'vocab')),
          (cfg.d_model, cfg.vocab_size), jnp.float32)
      logits_BxLxV = x_BxLxD @ head.astype(cfg.compute_dtype)
    logits_BxLxV = nn.with_logical_constraint(
        logits_BxLxV.astype(jnp.float32), ('batch', 'length', 'vocab'))
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, new_cache


  def _cms_inputs(self, random_expert: bool):
    """The CMS expert masks (state) and the random-expert key, if any."""
    cfg = self.config
    if cfg.mlp != 'cms':
      if random_expert:
        raise ValueError("random_expert=True needs a CMS model (mlp='cms').")
      return None, None
    initial = cms.init_active_state(cfg)
    if not self.is_initializing() and not self.has_variable(
        cms.CMS_COLLECTION, cms.level_name(0)):
      raise ValueError(
          "This is a CMS model (mlp='cms'): pass its expert masks too, "
          "apply({'params': params, 'cms': state}, ...) — see "
          'transformer.variables(params, model_state).')
    active = {name: self.variable(cms.CMS_COLLECTION, name,
                                  lambda v=value: v).value
              for name, value in initial.items()}
    key = self.make_rng('random_expert') if random_expert else None
    return active, key


def init_cache(config: TransformerConfig, batch: int, max_len: int,
               dtype=None) -> layers.KVCache:
  """An empty KV cache: per layer {'k', 'v'} of shape [batch, max_len, K, Dh]."""
  dtype = dtype or config.compute_dtype
  shape = (batch, max_len, config.num_kv_heads, config.resolved_head_dim)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
