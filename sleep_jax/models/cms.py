"""Continuum Memory System: the MLP slot as a chain of mixture-of-experts levels.

docs/design.md §2-3. The slot of each block maps its (normed) input z_0
through the levels, fastest first:

    z_l = z_{l-1} + y_l,   y_l = Level_l(z_{l-1}),   slot output = sum_l y_l

(the block adds the slot output to its residual stream, so with one level this
is exactly the plain MLP block). The sum is accumulated separately instead of
returning z_k - z_0 so that a level whose output is exactly zero (a freshly
added fast level with a zero down-projection) leaves the result bit-identical.

A level is a sparse mixture:

    Level(x) = Dense(x) + sum_{e in S(x)} sigmoid(router_e . x + b) * B_e act(A_e x)

* the dense SwiGLU expert is always kept (our reading of "top-k with the dense
  expert always kept");
* S(x) is the top_k - 1 *active* low-rank experts with the largest router
  logits (all active ones when fewer are active); inactive experts are masked
  out of the router and get exactly zero output and zero gradient;
* gates are independent sigmoids, not a softmax over the selected experts, so
  a new expert with B = 0 does not re-weight the others. b is the level's
  constant `gate_bias` (0 by default; negative keeps an expert closed except
  where its router row has learned to open it). It does not change which
  experts are selected. Growth is therefore
  bit-exactly function-preserving whenever the level's active low-rank
  experts fit its top-k budget (#active <= top_k - 1 after growing). Beyond
  that budget a new expert competes for the top-k slots from its first step,
  and can displace an older one for some tokens, so growth there is not
  exactly function-preserving (see README, "CMS").

The `active` masks are model *state* (the 'cms' collection, one bool[E_max]
per level, shared by all layers), never shapes: growing or resetting an
expert changes data only, so jitted steps never recompile. All E_max experts
are computed for every token and masked: with E_max * r small next to the
dense width this costs little and keeps shapes static.

`random_expert=True` (with a 'random_expert' rng) adds one uniformly random
active low-rank expert per token on top of the top-k (dreaming,
docs/design.md §5).
"""

from __future__ import annotations

from dataclasses import replace as dataclasses_replace

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_jax.models.config import CMSLevel, TransformerConfig
from sleep_jax.models.layers import SwiGLU

Array = jax.Array
CMS_COLLECTION = 'cms'


def level_name(level: int) -> str:
  return f'level_{level}'


def level_params(params, level: int):
  """The params of one CMS level in every layer, in the original nesting."""
  name = level_name(level)
  return {layer: {'mlp': {name: sub['mlp'][name]}}
          for layer, sub in params.items() if layer.startswith('layers_')}


def with_level_params(params, level_tree):
  """`params` with the leaves of a `level_params` tree swapped in."""
  out = dict(params)
  for layer, sub in level_tree.items():
    mlp = dict(out[layer]['mlp'])
    mlp.update(sub['mlp'])
    out[layer] = {**out[layer], 'mlp': mlp}
  return out


def init_active_state(config: TransformerConfig) -> dict:
  """The 'cms' collection with every low-rank expert inactive."""
  return {level_name(l): jnp.zeros((lvl.num_experts,), jnp.bool_)
          for l, lvl in enumerate(config.cms_levels)}


def _select(logits_BxLxE, active_E, top_k: int, random_key):
  """Boolean [B, L, E]: the experts each token uses (besides the dense one)."""
  num_experts = active_E.shape[0]
  budget = top_k - 1
  if budget >= num_experts:
    selected = jnp.broadcast_to(active_E, logits_BxLxE.shape)
  elif budget == 0:
    selected = jnp.zeros(logits_BxLxE.shape, jnp.bool_)
  else:
    scores = jnp.where(active_E, logits_BxLxE, -jnp.inf)
    _, top_BxLxK = jax.lax.top_k(scores, budget)
    picked = jnp.any(jax.nn.one_hot(top_BxLxK, num_experts, dtype=jnp.bool_),
                     axis=-2)
    selected = picked & active_E
  if random_key is not None:
    # Uniform over the active experts; nothing is added where none is active.
    uniform = jnp.where(active_E, 0.0, -jnp.inf)
    choice_BxL = jax.random.categorical(
        random_key, jnp.broadcast_to(uniform, logits_BxLxE.shape))
    extra = jax.nn.one_hot(choice_BxL, num_experts, dtype=jnp.bool_)
    selected = selected | (extra & active_E)
  return selected


class CMSLevelMoE(nn.Module):
  """One CMS level: dense SwiGLU expert + E_max masked low-rank experts."""

  config: TransformerConfig
  level: CMSLevel

  @nn.compact
  def __call__(self, x_BxLxD, active_E, random_key=None):
    cfg, lvl = self.config, self.level
    d, r, e = cfg.d_model, lvl.rank, lvl.num_experts
    dt = cfg.compute_dtype
    y_BxLxD = SwiGLU(cfg, width=lvl.width or cfg.d_ff, name='dense')(x_BxLxD)

    # Slots start at zero; `growth.grow` gives A its random init when a slot
    # is unlocked (B stays 0 so growing preserves the function).
    zeros = nn.initializers.zeros
    a_ExDxR = self.param('lowrank_a', nn.with_logical_partitioning(
        zeros, ('expert', 'embed', 'rank')), (e, d, r), jnp.float32)
    b_ExRxD = self.param('lowrank_b', nn.with_logical_partitioning(
        zeros, ('expert', 'rank', 'embed')), (e, r, d), jnp.float32)
    router_DxE = self.param('router', nn.with_logical_partitioning(
        zeros, ('embed', 'expert')), (d, e), jnp.float32)

    logits_BxLxE = jnp.einsum('bld,de->ble', x_BxLxD.astype(jnp.float32),
                              router_DxE)
    selected_BxLxE = _select(logits_BxLxE, active_E, lvl.top_k, random_key)
    gates_BxLxE = jnp.where(selected_BxLxE,
                            jax.nn.sigmoid(logits_BxLxE + lvl.gate_bias), 0.0)
    h_BxLxExR = jax.nn.silu(jnp.einsum('bld,edr->bler', x_BxLxD,
                                       a_ExDxR.astype(dt)))
    h_BxLxExR = nn.with_logical_constraint(
        h_BxLxExR, ('batch', 'length', 'expert', 'rank'))
    lowrank_BxLxD = jnp.einsum('bler,ble,erd->bld', h_BxLxExR,
                               gates_BxLxE.astype(dt), b_ExRxD.astype(dt))
    return y_BxLxD + lowrank_BxLxD


class CMSChain(nn.Module):
  """The MLP slot: the CMS levels applied in sequence, fastest first."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, active, random_key=None):
    z_BxLxD, out_BxLxD = x_BxLxD, None
    for l, lvl in enumerate(self.config.cms_levels):
      key = None if random_key is None else jax.random.fold_in(random_key, l)
      y_BxLxD = CMSLevelMoE(self.config, lvl, name=level_name(l))(
          z_BxLxD, active[level_name(l)], key)
      z_BxLxD = z_BxLxD + y_BxLxD
      out_BxLxD = y_BxLxD if out_BxLxD is None else out_BxLxD + y_BxLxD
    return out_BxLxD


def active_param_count(config: TransformerConfig, model_state) -> int:
  """Parameters that take part in the forward pass.

  Counts every dense expert and the active low-rank experts (A, B and their
  router row); inactive pre-allocated slots are excluded.
  """
  if config.mlp != 'cms':
    return config.num_params()
  d = config.d_model
  inactive = 0
  for l, lvl in enumerate(config.cms_levels):
    active = int(jnp.sum(model_state[CMS_COLLECTION][level_name(l)]))
    inactive += (lvl.num_experts - active) * (2 * d * lvl.rank + d)
  return config.num_params() - config.num_layers * inactive


def add_fast_levels(config: TransformerConfig, params,
                    fast_levels, slowest: CMSLevel, rng):
  """Pretrained-backbone mode: small fast CMS levels before the MLP.

  docs/design.md §2.

  Takes a plain model (e.g. from `load_hf_checkpoint` / `load_gguf`) and
  returns (cms_config, params, model_state) where each block's MLP slot is
  `fast_levels` (fastest first, e.g. width 64) followed by the backbone's own
  MLP as the slowest level (`slowest` gives its chunk size, expert slots and
  optimiser; its width is the backbone's d_ff). New fast levels start with a
  zero down-projection and no active experts, so the returned model computes
  exactly the backbone's logits.
  """
  if config.mlp != 'swiglu':
    raise ValueError(f'add_fast_levels needs a plain backbone (mlp="swiglu"); '
                     f'got mlp={config.mlp!r}.')
  if slowest.width not in (None, config.d_ff):
    raise ValueError(f'the slowest level is the backbone MLP: its width must be '
                     f'None or d_ff={config.d_ff}; got {slowest.width}.')
  levels = tuple(fast_levels) + (dataclasses_replace(slowest, width=None),)
  cms_config = dataclasses_replace(config, mlp='cms', cms_levels=levels)
  x = jnp.zeros((1, 1, config.d_model), cms_config.compute_dtype)
  state = init_active_state(cms_config)
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  last = len(levels) - 1
  for i in range(config.num_layers):
    layer = dict(params[f'layers_{i}'])
    backbone_mlp = layer['mlp']
    slot = {}
    for l, lvl in enumerate(levels):
      key = jax.random.fold_in(jax.random.fold_in(rng, i), l)
      fresh = nn.meta.unbox(CMSLevelMoE(cms_config, lvl).init(
          key, x, state[level_name(l)])['params'])
      if l == last:
        fresh['dense'] = backbone_mlp
      else:
        dense = dict(fresh['dense'])
        dense['down_kernel'] = jnp.zeros_like(dense['down_kernel'])
        fresh['dense'] = dense
      slot[level_name(l)] = fresh
    layer['mlp'] = slot
    out[f'layers_{i}'] = layer
  return cms_config, out, {CMS_COLLECTION: state}
