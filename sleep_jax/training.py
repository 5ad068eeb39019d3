"""Language-model training pieces: loss, optimiser, train state, train step.

The step is a pure function `(state, batch) -> (state, metrics)`;
`compile_train_step` jits it once with in/out shardings and donates the state.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import sharding as sharding_lib
from sleep_jax.models import transformer


@flax.struct.dataclass
class TrainState:
  """step, params, optimiser state, and the model's non-param state.

  model_state holds the variable collections that are not trained, e.g. a
  CMS model's expert masks ({'cms': ...}); it is {} for a plain model.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any


def next_token_loss(logits_BxLxV, targets_BxL, mask_BxL):
  """Mean cross-entropy over the positions where mask is 1.

  Returns (loss, number of tokens counted). An all-zero mask gives loss 0.
  """
  mask = mask_BxL.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  tokens = jnp.sum(mask)
  return jnp.sum(xent * mask) / jnp.maximum(tokens, 1.0), tokens


class DivergenceError(FloatingPointError):
  """Training that diverged; the message names the rate to lower."""


def divergence(losses, vocab_size: int, patience: int) -> str | None:
  """Why per-step training `losses` show divergence, or None.

  Not finite anywhere; or, after some step was below the loss of a uniform
  prediction (ln V), `patience` steps in a row at or above it: a model that
  was learning and now outputs noise (a learning rate far too large) without
  ever reaching NaN.
  """
  losses = np.asarray(losses, np.float64).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    return f'the loss is {losses[bad[0]]} at step {bad[0] + 1}'
  uniform = float(np.log(vocab_size))
  below = np.flatnonzero(losses < uniform)
  if not below.size or patience < 1:
    return None
  run = 0
  for i in range(below[0] + 1, len(losses)):
    run = run + 1 if losses[i] >= uniform else 0
    if run >= patience:
      return (f'the loss stayed at or above ln V = {uniform:.2f} (a uniform '
              f'prediction) for {patience} steps, up to step {i + 1} '
              f'(loss {losses[i]:.4g})')
  return None


def decay_mask(params):
  """True for weight matrices; False for norm scales and biases."""
  def decays(path, p):
    name = str(getattr(path[-1], 'key', path[-1]))
    return p.ndim >= 2 and not name.endswith('bias') and name != 'scale'
  return jax.tree_util.tree_map_with_path(decays, params)


def lm_loss(model: nn.Module, params, batch: Mapping[str, jax.Array],
            model_state=None):
  """(masked next-token loss, token count) of `model` on one batch."""
  logits = model.apply(transformer.variables(params, model_state),
                       batch['inputs'],
                       positions=batch.get('positions'),
                       segment_ids=batch.get('segment_ids'))
  return next_token_loss(logits, batch['targets'], batch['mask'])


def make_optimizer(opt: Mapping[str, Any], total_steps: int,
                   key: str = 'optimizer', steps_key: str = 'num_train_steps') -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a warmup + cosine schedule.

  Keys: learning_rate, warmup_steps, min_lr_ratio, b1, b2, eps, weight_decay,
  grad_clip. Weight decay applies to matrices only (not norms or biases).
  """
  lr = float(opt['learning_rate'])
  warmup = int(opt['warmup_steps'])
  if not lr > 0:  # NaN too
    raise ValueError(f'{key}.learning_rate={lr} must be positive.')
  if not 0 <= warmup <= total_steps:
    raise ValueError(f'{key}.warmup_steps={warmup} must be in [0, '
                     f'{steps_key}={total_steps}].')
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=lr * float(opt['min_lr_ratio']))
  return optax.chain(
      optax.clip_by_global_norm(float(opt['grad_clip'])),
      optax.adamw(schedule, b1=float(opt['b1']), b2=float(opt['b2']),
                  eps=float(opt['eps']), weight_decay=float(opt['weight_decay']),
                  mask=decay_mask),
  ), schedule


def create_train_state(model: nn.Module, optimizer, rng, example_tokens):
  """A boxed (logically partitioned) train state; see sharding.init_sharded."""
  variables = dict(model.init(rng, example_tokens))
  params = variables.pop('params')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), model_state=variables)


def train_step(model: nn.Module, optimizer, schedule, state: TrainState,
               batch: Mapping[str, jax.Array]):
  """One AdamW step on the masked next-token loss."""

  (loss, tokens), grads = jax.value_and_grad(
      functools.partial(lm_loss, model, batch=batch,
                        model_state=state.model_state),
      has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': schedule(state.step), 'tokens': tokens}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    model_state=state.model_state), metrics


def compile_train_step(model, optimizer, schedule, state_shardings, mesh, rules):
  """`jit(train_step)` with explicit shardings and the state donated."""
  return sharding_lib.compile_step(
      lambda state, batch: train_step(model, optimizer, schedule, state, batch),
      mesh, rules,
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)))
