"""Wake: the online multi-frequency CMS update (docs/design.md §2).

Each wake step takes one chunk of the stream (a batch of token rows),
computes the next-token loss gradient with respect to the levels that learn
in wake (chunk_size > 0), and adds it to that level's running sum. Level l
applies its optimiser to the summed gradient exactly when the number of steps
since the session began is a multiple of C^(l), then clears the sum:

    theta_l <- theta_l + tx_l(sum_{t in chunk} grad_l(theta_t; x_t))

With plain SGD this is the chunk update `theta - sum_t eta * g_t` of
docs/design.md §2. With a stateful optimiser (Adam) the chunk's summed
gradient is one optimiser step. Passing `boundary=True` on the last step of
a session also flushes every level's partial chunk and restarts the chunk
phase (our reading, docs/design.md §2).

Every other parameter (attention, embeddings, norms) stays frozen in wake,
and so do inactive experts (zero gradient, zero update, zero optimiser
moments). "Which levels update now" is data (`lax.cond` on the step count),
so one compiled step serves the whole schedule, and growing or resetting
experts between steps does not recompile it. Grow and reset experts of a
running wake state with `wake.grow` / `wake.reset`, which also clear the
slot's pending gradient and optimiser moments.

An optional anchor holds the model near a frozen copy of itself (the model
before wake): `weight` x JSD(frozen || model) on the frozen model's own
samples, carried in the batch as `anchor_tokens` / `anchor_mask`. It keeps
the always-on fast expert from overwriting what the model knew, so the
post-wake model that sleep distils from is a cleaner teacher.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import growth
from sleep_jax import sharding as sharding_lib
from sleep_jax.divergences import generalized_jsd
from sleep_jax.models import cms
from sleep_jax.models import transformer
from sleep_jax.models.config import CMSLevel, TransformerConfig
from sleep_jax.training import next_token_loss


@flax.struct.dataclass
class WakeState:
  """Everything the wake loop carries from step to step.

  params / model_state: the whole model (params, and the 'cms' masks).
  opt_states / grad_sums: one entry per wake level (`wake_levels(config)`),
    over that level's params only (`cms.level_params`).
  phase: steps since the session began (the chunk clock).
  step: wake steps taken in total.
  """

  params: Any
  model_state: Any
  opt_states: tuple
  grad_sums: tuple
  phase: jax.Array
  step: jax.Array


def wake_levels(config: TransformerConfig) -> tuple[int, ...]:
  """Indices of the levels that learn in wake (chunk_size > 0)."""
  return tuple(l for l, lvl in enumerate(config.cms_levels) if lvl.chunk_size)


def level_optimizer(level: CMSLevel) -> optax.GradientTransformation:
  if level.optimizer == 'sgd':
    return optax.sgd(level.learning_rate)
  if level.optimizer == 'adam':
    return optax.adam(level.learning_rate)
  return optax.adamw(level.learning_rate)


def check_config(config: TransformerConfig) -> None:
  """Fails (before compiling) unless `config` is a CMS model with a wake level."""
  if config.mlp != 'cms':
    raise ValueError(f"wake needs a CMS model: model.mlp={config.mlp!r}; set "
                     "model.mlp='cms' and model.cms_levels.")
  if not wake_levels(config):
    raise ValueError('model.cms_levels: every level has chunk_size=0, so '
                     'nothing would learn in wake; give the fast levels a '
                     'chunk_size >= 1.')


def init_wake_state(config: TransformerConfig, params, model_state) -> WakeState:
  """A wake state at the start of a session (works on boxed trees too)."""
  check_config(config)
  levels = wake_levels(config)
  opt_states = tuple(
      level_optimizer(config.cms_levels[l]).init(cms.level_params(params, l))
      for l in levels)
  grad_sums = tuple(jax.tree.map(jnp.zeros_like, cms.level_params(params, l))
                    for l in levels)
  return WakeState(params=params, model_state=model_state,
                   opt_states=opt_states, grad_sums=grad_sums,
                   phase=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32))


def _update_mask(config, params, model_state, level):
  active_E = model_state[cms.CMS_COLLECTION][cms.level_name(level)]
  full = growth.expert_mask(params, level, active_E,
                            dense=config.cms_levels[level].update_dense)
  return cms.level_params(full, level)


def wake_step(model: nn.Module, state: WakeState, batch: Mapping[str, jax.Array],
              boundary, anchor=None) -> tuple[WakeState, dict]:
  """One chunk of the stream. `boundary`: bool scalar, last step of a session.

  `anchor`: None, or {'params', 'model_state', 'weight'} of a frozen model;
  then `batch` also holds `anchor_tokens` / `anchor_mask` (its samples).
  """
  config = model.config
  levels = wake_levels(config)
  trees = tuple(cms.level_params(state.params, l) for l in levels)

  def loss_fn(level_trees):
    params = state.params
    for tree in level_trees:
      params = cms.with_level_params(params, tree)
    variables = transformer.variables(params, state.model_state)
    logits = model.apply(variables, batch['inputs'],
                         positions=batch.get('positions'),
                         segment_ids=batch.get('segment_ids'))
    loss, tokens = next_token_loss(logits, batch['targets'], batch['mask'])
    if anchor is not None:
      frozen = jax.lax.stop_gradient(model.apply(
          transformer.variables(anchor['params'], anchor['model_state']),
          batch['anchor_tokens']))
      loss += anchor['weight'] * generalized_jsd(
          model.apply(variables, batch['anchor_tokens']), frozen,
          batch['anchor_mask'], beta=0.5)
    return loss, tokens

  (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(trees)
  phase = state.phase + 1
  boundary = jnp.asarray(boundary, jnp.bool_)
  params = state.params
  opt_states, grad_sums, updated = [], [], []
  for i, l in enumerate(levels):
    level = config.cms_levels[l]
    tx = level_optimizer(level)
    mask = _update_mask(config, state.params, state.model_state, l)
    inactive_E = ~state.model_state[cms.CMS_COLLECTION][cms.level_name(l)]
    grad_sum = jax.tree.map(jnp.add, state.grad_sums[i],
                            growth.mask_tree(grads[i], mask))
    due = (phase % level.chunk_size == 0) | boundary

    def apply(tree, opt_state, grad_sum, tx=tx, mask=mask, l=l,
              inactive_E=inactive_E):
      updates, opt_state = tx.update(grad_sum, opt_state, tree)
      tree = growth.apply_masked_updates(tree, updates, mask)
      # Inactive slots keep zero moments, so a slot grown later starts fresh.
      return tree, growth.zero_slots(opt_state, l, inactive_E)

    tree, opt_state = jax.lax.cond(
        due, apply, lambda t, o, g: (t, o), trees[i], state.opt_states[i],
        grad_sum)
    params = cms.with_level_params(params, tree)
    opt_states.append(opt_state)
    grad_sums.append(jax.tree.map(lambda g: jnp.where(due, 0.0, g).astype(g.dtype),
                                  grad_sum))
    updated.append(due)

  new_state = WakeState(
      params=params, model_state=state.model_state,
      opt_states=tuple(opt_states), grad_sums=tuple(grad_sums),
      phase=jnp.where(boundary, 0, phase).astype(jnp.int32),
      step=state.step + 1)
  metrics = {'loss': loss, 'tokens': tokens,
             'updated_levels': jnp.stack(updated).astype(jnp.int32),
             'grad_norm': optax.tree.norm(grads)}
  return new_state, metrics


def _forget_slots(state: WakeState, level: int, slots) -> WakeState:
  """Clears the pending gradient sums and optimiser moments of expert slots."""
  active_E = state.model_state[cms.CMS_COLLECTION][cms.level_name(level)]
  slots_E = np.zeros(active_E.shape, np.bool_)
  slots_E[list(slots)] = True
  clear = lambda tree: growth.zero_slots(tree, level, jnp.asarray(slots_E))
  cleared = (tuple(map(clear, state.opt_states)),
             tuple(map(clear, state.grad_sums)))
  opt_states, grad_sums = sharding_lib.place_like(
      cleared, (state.opt_states, state.grad_sums))
  return state.replace(opt_states=opt_states, grad_sums=grad_sums)


def grow(state: WakeState, level: int, rng) -> tuple[WakeState, int]:
  """`growth.grow` during wake: the new slot also starts with no pending
  gradient and zero optimiser moments (none inherited from a reset expert)."""
  params, model_state, slot = growth.grow(state.params, state.model_state,
                                          level, rng)
  state = state.replace(params=params, model_state=model_state)
  return _forget_slots(state, level, [slot]), slot


def reset(state: WakeState, level: int, slots) -> WakeState:
  """`growth.reset` during wake, clearing the slots' wake memory too."""
  slots = [int(s) for s in slots]
  params, model_state = growth.reset(state.params, state.model_state, level,
                                     slots)
  state = state.replace(params=params, model_state=model_state)
  return _forget_slots(state, level, slots)


def wake_state_shardings(model: nn.Module, mesh, rules, example_tokens):
  """NamedShardings of a WakeState for `model` (traced only, nothing built)."""
  def boxed_state(rng):
    variables = model.init(rng, example_tokens)
    params = variables.pop('params')
    return init_wake_state(model.config, params, variables)
  _, shardings = sharding_lib.abstract_sharded(boxed_state, mesh, rules,
                                               jax.random.key(0))
  return shardings


def compile_wake_step(model: nn.Module, state_shardings, mesh, rules,
                      anchored: bool = False):
  """`jit(wake_step)` with explicit shardings; the state is donated.

  Returns `step(state, batch, boundary[, anchor]) -> (state, metrics)`;
  `step.jitted` is the jitted function (for compile counting). With
  `anchored`, every call passes the anchor (see `wake_step`).
  """
  replicated = sharding_lib.replicated(mesh)
  in_shardings = (state_shardings, sharding_lib.batch_sharding(mesh, rules),
                  replicated)
  if anchored:
    in_shardings += ({'params': state_shardings.params,
                      'model_state': state_shardings.model_state,
                      'weight': replicated},)
  compiled = sharding_lib.compile_step(
      lambda state, batch, boundary, *anchor: wake_step(
          model, state, batch, boundary, *anchor),
      mesh, rules, in_shardings=in_shardings,
      out_shardings=(state_shardings, replicated))

  def step(state, batch, boundary=False, anchor=None):
    if (anchor is not None) != anchored:
      raise ValueError(f'this wake step was compiled with anchored={anchored}'
                       f' and called with anchor={"set" if anchor else None}.')
    extra = () if anchor is None else (
        {**anchor, 'weight': jnp.float32(anchor['weight'])},)
    return compiled(state, batch, jnp.asarray(boundary, jnp.bool_), *extra)

  step.jitted = compiled.jitted
  return step
