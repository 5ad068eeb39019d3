"""The continual-learning baselines' update programs (docs/design.md §10.1).

Each trains on one session's rows in one compiled `lax.scan` over host-drawn
[steps, batch, L] batches (one shape every session, so nothing recompiles):

* `finetune`: every parameter, Adam, with an optional EWC penalty
  (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017);
  replay is the caller mixing old rows into the batches;
* `lora_finetune`: one LoRA adapter (unmerged, through the model's 'lora'
  collection) that keeps training from session to session;
* `fisher_diagonal`: the empirical Fisher's diagonal on a session's rows, for
  online EWC (the caller sums it over sessions and moves the anchor);
* `self_samples`: BOS continuations sampled by a frozen model, the rows of
  the self-distillation anchor (LwF-style, Li & Hoiem 2017): with
  `self_anchor`, `finetune` adds weight * JSD(frozen model || model) on them
  (beta 0.5, temperature 1: Sleep's default KS divergence, sleep_jax.seeding).
  The frozen
  model is fixed for the whole session, so its samples are drawn once, up
  front, and nothing is stored across sessions.

Inactive CMS experts have zero gradient, and Adam without weight decay leaves
them at exactly zero, so growth state stays meaningful under fine-tuning.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import sampling
from sleep_jax.divergences import generalized_jsd
from sleep_jax.models import lora
from sleep_jax.models.layers import LORA_COLLECTION
from sleep_jax.models.transformer import variables
from sleep_jax.sequences import join
from sleep_jax.stage_config import dataclass_from_dict
from sleep_jax.training import next_token_loss


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """The baselines' knobs (config keys `baselines.<field>`); their learning
  rates are the validation-world sweep's choice (experiments/configs/
  continual.py, experiments/results/continual.md).
  `<method>_learning_rate` is the rate of each fine-tuning method;
  anchor_*: `finetune_anchor`'s self-distillation term (weight, BOS samples
  per step and their length)."""
  finetune_learning_rate: float = 3e-5
  finetune_anchor_learning_rate: float = 3e-4
  finetune_compute_learning_rate: float = 1e-5
  lora_learning_rate: float = 3e-5
  replay_learning_rate: float = 1e-4
  replay_all_learning_rate: float = 1e-3
  ewc_learning_rate: float = 3e-5
  anchor_weight: float = 10.0
  anchor_batch_size: int = 8
  anchor_max_new_tokens: int = 16
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple = lora.ALL_KERNELS
  replay_fraction: float = 0.5
  ewc_weight: float = 100.0
  fisher_rows: int = 64

  def __post_init__(self):
    for name in ('finetune_learning_rate', 'finetune_anchor_learning_rate',
                 'finetune_compute_learning_rate', 'lora_learning_rate',
                 'replay_learning_rate', 'replay_all_learning_rate',
                 'ewc_learning_rate', 'lora_alpha'):
      if not getattr(self, name) > 0:
        raise ValueError(f'baselines.{name}={getattr(self, name)} must be > 0.')
    if not 0 < self.replay_fraction < 1:
      raise ValueError(f'baselines.replay_fraction={self.replay_fraction} '
                       'must be in (0, 1).')
    if self.anchor_weight < 0:
      raise ValueError(f'baselines.anchor_weight={self.anchor_weight} must '
                       'be >= 0 (0 = no anchor term).')
    for name in ('anchor_batch_size', 'anchor_max_new_tokens'):
      if getattr(self, name) < 1:
        raise ValueError(f'baselines.{name}={getattr(self, name)} must be '
                         '>= 1.')
    if self.ewc_weight < 0 or self.fisher_rows < 1:
      raise ValueError('baselines.ewc_weight must be >= 0 and '
                       'baselines.fisher_rows >= 1; got '
                       f'{self.ewc_weight}, {self.fisher_rows}.')
    self.lora  # validates rank / targets

  @property
  def lora(self) -> lora.LoraConfig:
    return lora.LoraConfig(self.lora_rank, self.lora_alpha,
                           lora.hashable_targets(self.lora_targets))

  @classmethod
  def from_dict(cls, values, key: str = 'baselines'):
    values = dict(values)
    if 'lora_targets' in values:
      values['lora_targets'] = lora.hashable_targets(values['lora_targets'])
    return dataclass_from_dict(cls, values, key)


def draw_batches(rows: dict, steps: int, batch_size: int,
                 rng: np.random.Generator, old_rows: dict | None = None,
                 old_fraction: float = 0.0) -> dict:
  """[steps, batch_size, L] arrays of `rows` drawn uniformly; with `old_rows`,
  round(old_fraction * batch_size) of each batch come from them (replay)."""
  n_old = int(round(old_fraction * batch_size)) if old_rows else 0
  idx = rng.integers(len(rows['inputs']), size=(steps, batch_size - n_old))
  out = {k: v[idx] for k, v in rows.items()}
  if n_old:
    old = rng.integers(len(old_rows['inputs']), size=(steps, n_old))
    out = {k: np.concatenate([out[k], old_rows[k][old]], axis=1) for k in out}
  return out


def _loss(model, params, model_state, batch, adapter=None, lora_cfg=None):
  tree = variables(params, model_state)
  if adapter is not None:
    tree = {**tree,
            LORA_COLLECTION: lora.as_collection(params, adapter, lora_cfg)}
  logits = model.apply(tree, batch['inputs'])
  return next_token_loss(logits, batch['targets'], batch['mask'])[0]


def self_samples(model: nn.Module, params, model_state, *, steps: int,
                 batch_size: int, max_new_tokens: int, rng, bos_id: int,
                 eos_id: int | None, pad_id: int, temperature: float = 1.0
                 ) -> dict:
  """[steps, batch_size, 1 + max_new_tokens] BOS continuations sampled by
  (params, model_state), joined with BOS: {'tokens', 'mask'} (mask marks the
  positions that predict a sampled token)."""
  n = steps * batch_size
  prompts = np.full((n, 1), bos_id, np.int32)
  out = sampling.sample(model, params, prompts, np.ones((n,), np.int32),
                        max_new_tokens=max_new_tokens, rng=rng,
                        temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                        model_state=model_state)
  tokens, mask = join(jnp.asarray(prompts), jnp.ones((n,), jnp.int32),
                      out.tokens, out.lengths, pad_id=pad_id)
  shape = (steps, batch_size, tokens.shape[1])
  return {'tokens': np.asarray(tokens).reshape(shape),
          'mask': np.asarray(mask).reshape(shape)}


@functools.partial(jax.jit, static_argnums=(0,))
def _finetune(model, params, model_state, batches, learning_rate, anchor,
              fisher, ewc_weight, self_anchor):
  tx = optax.adam(learning_rate)

  def loss_fn(p, batch):
    loss = _loss(model, p, model_state, batch)
    if self_anchor is not None:
      frozen = jax.lax.stop_gradient(model.apply(
          variables(self_anchor['params'], self_anchor['model_state']),
          batch['anchor_tokens']))
      loss += self_anchor['weight'] * generalized_jsd(
          model.apply(variables(p, model_state), batch['anchor_tokens']),
          frozen, batch['anchor_mask'], beta=0.5)
    if fisher is None:  # no EWC: no penalty term in the program
      return loss
    penalty = sum(jnp.sum(f * (x - a) ** 2) for f, x, a in zip(
        jax.tree.leaves(fisher), jax.tree.leaves(p), jax.tree.leaves(anchor)))
    return loss + 0.5 * ewc_weight * penalty

  def step(carry, batch):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
  return params, losses


def finetune(model: nn.Module, params, model_state, batches: dict, *,
             learning_rate: float, anchor=None, fisher=None,
             ewc_weight: float = 0.0, self_anchor: dict | None = None):
  """Adam on every parameter over `batches` ([S, B, L] inputs/targets/mask).
  With `fisher` and `anchor` (params-shaped) adds the EWC penalty. With
  `self_anchor` = {'params', 'model_state', 'weight', 'rows'} (rows from
  `self_samples`, one [B', L'] batch per step) adds weight * JSD(that model
  || model) on them. Returns (params, per-step losses)."""
  batches = dict(batches)
  if self_anchor is not None:
    rows = self_anchor['rows']
    if len(rows['tokens']) != len(batches['inputs']):
      raise ValueError(f'self_anchor has {len(rows["tokens"])} batches of '
                       f'rows for {len(batches["inputs"])} steps.')
    batches.update(anchor_tokens=rows['tokens'], anchor_mask=rows['mask'])
    self_anchor = {'params': self_anchor['params'],
                   'model_state': self_anchor['model_state'],
                   'weight': jnp.float32(self_anchor['weight'])}
  params, losses = _finetune(model, params, model_state,
                             jax.tree.map(jnp.asarray, batches),
                             jnp.float32(learning_rate), anchor, fisher,
                             jnp.float32(ewc_weight), self_anchor)
  return params, np.asarray(losses)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lora_finetune(model, lora_cfg, params, model_state, adapter, batches,
                   learning_rate):
  tx = optax.adam(learning_rate)

  def step(carry, batch):
    ad, opt_state = carry
    loss, grads = jax.value_and_grad(
        lambda a: _loss(model, params, model_state, batch, a, lora_cfg))(ad)
    updates, opt_state = tx.update(grads, opt_state, ad)
    return (optax.apply_updates(ad, updates), opt_state), loss

  (adapter, _), losses = jax.lax.scan(step, (adapter, tx.init(adapter)),
                                      batches)
  return adapter, losses


def lora_finetune(model: nn.Module, lora_cfg: lora.LoraConfig, params,
                  model_state, adapter, batches: dict, *, learning_rate: float):
  """Adam on the LoRA `adapter` only; returns (adapter, per-step losses)."""
  adapter, losses = _lora_finetune(model, lora_cfg, params, model_state,
                                   adapter, jax.tree.map(jnp.asarray, batches),
                                   jnp.float32(learning_rate))
  return adapter, np.asarray(losses)


@functools.partial(jax.jit, static_argnums=(0,))
def _fisher(model, params, model_state, rows):
  def one(row):
    batch = jax.tree.map(lambda x: x[None], row)
    grads = jax.grad(lambda p: _loss(model, p, model_state, batch))(params)
    return jax.tree.map(jnp.square, grads)

  def add(total, row):
    return jax.tree.map(jnp.add, total, one(row)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  total, _ = jax.lax.scan(add, zeros, rows)
  return jax.tree.map(lambda x: x / len(rows['inputs']), total)


def fisher_diagonal(model: nn.Module, params, model_state, rows: dict):
  """E_rows[(d log p(row) / d theta)^2], one row at a time (no per-example
  gradient batch is ever materialised)."""
  return _fisher(model, params, model_state, jax.tree.map(jnp.asarray, rows))
