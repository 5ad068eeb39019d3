"""The SFT programs of dreaming, each one jitted program (docs/design.md §5).

* `isolated_copy` / `evaluate`: a fresh LoRA per dream, a few SFT steps on
  that dream's own data (`CopyData`: a text dream's row, or the rows an ARC
  strategy builds, with the copy's own learning rate and step count), tau
  before and after; all copies in one vmapped program.
* `train_generator`: ReST-EM's M-step on the dream generator's LoRA.
* `rehearse` (+ `self_replay`): the unlocked expert slots learn the accepted
  dreams while a KL term, on an anchor model's own samples, holds the model
  to it: the model before rehearsal, or a given `anchor` (sleep gives the
  pre-wake model: the new expert fires on old inputs, and the model before
  rehearsal already carries wake's damage to old knowledge, which an
  anchor to it would hold in place).

LoRAs are applied unmerged, through the model's 'lora' variable collection,
so vmapped copies share every base matmul and no kernel-sized gradient is
formed. Training loops are `lax.scan`s over host-drawn [steps, batch, L]
batches: one shape whatever the number of rows, so nothing recompiles from
one sleep cycle to the next. `cfg` is a `sleep_jax.dreaming.DreamingConfig`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import sampling
from sleep_jax import sharding as sharding_lib
from sleep_jax.divergences import forward_kl
from sleep_jax.models import cms
from sleep_jax.models import lora
from sleep_jax.models.layers import LORA_COLLECTION
from sleep_jax.models.transformer import variables
from sleep_jax.sequences import completion_logprobs, join


# ------------------------------------------------------------------ losses ---


def _variables(params, model_state, adapter, cfg=None):
  out = variables(params, model_state)
  if adapter is not None:
    out = {**out,
           LORA_COLLECTION: lora.as_collection(params, adapter, cfg.lora)}
  return out


def sft_loss(model: nn.Module, params, model_state, tokens_BxL, mask_BxL,
             adapter=None, cfg=None):
  """Mean next-token NLL at the positions `mask` marks (sequences.join's), of
  the model with an optional LoRA `adapter` (cfg.lora's)."""
  logits = model.apply(_variables(params, model_state, adapter, cfg),
                       tokens_BxL)
  logp = completion_logprobs(logits, tokens_BxL)
  return -(logp * mask_BxL).sum() / jnp.maximum(mask_BxL.sum(), 1.0)


def tau(model: nn.Module, params, model_state, items, metric: str,
        adapter=None, cfg=None):
  """The task metric on one context's items [Q, L]: 'accuracy' = fraction
  recalled exactly (eval.recall_accuracy's rule), 'answer_logprob' = mean
  log-probability per answer token."""
  logits = model.apply(_variables(params, model_state, adapter, cfg),
                       items['inputs'])
  answer = items['answer_mask']
  if metric == 'accuracy':
    hit = (jnp.argmax(logits, -1) == items['targets']) | (answer == 0)
    return jnp.mean(jnp.all(hit, -1).astype(jnp.float32))
  logp = jax.nn.log_softmax(logits, -1)
  picked = jnp.take_along_axis(logp, items['targets'][..., None], -1)[..., 0]
  per_item = (picked * answer).sum(-1) / jnp.maximum(answer.sum(-1), 1.0)
  return per_item.mean()


def dream_rows(dreams_BxN, lengths_B, *, bos_id: int, pad_id: int):
  """SFT rows `BOS + dream` and their loss masks (the dream alone is the data)."""
  batch = dreams_BxN.shape[0]
  bos = jnp.full((batch, 1), bos_id, jnp.int32)
  return join(bos, jnp.ones((batch,), jnp.int32), jnp.asarray(dreams_BxN),
              jnp.asarray(lengths_B), pad_id=pad_id)


# --------------------------------------------------------------- evaluate ---


class CopyData(NamedTuple):
  """What each isolated copy trains on (leading copy axis N when batched).

  tokens / mask: [S, B, L] SFT rows per step (mask: sequences.join's);
  learning_rate: [] Adam's rate; active: bool [S], steps past a copy's own
  step count leave its LoRA and optimiser state untouched.
  """
  tokens: Any
  mask: Any
  learning_rate: Any
  active: Any


def dream_copies(tokens_NxL, mask_NxL, cfg) -> CopyData:
  """Text dreams: each copy takes `eval_steps` steps on its one dream row at
  `eval_learning_rate`."""
  tokens = jnp.asarray(tokens_NxL)[:, None, None]
  mask = jnp.asarray(mask_NxL)[:, None, None]
  n, steps = tokens.shape[0], cfg.eval_steps
  return CopyData(
      jnp.broadcast_to(tokens, (n, steps) + tokens.shape[2:]),
      jnp.broadcast_to(mask, (n, steps) + mask.shape[2:]),
      jnp.full((n,), cfg.eval_learning_rate, jnp.float32),
      jnp.ones((n, steps), jnp.bool_))


class Evaluation(NamedTuple):
  tau_before: jax.Array  # [N]
  tau_after: jax.Array   # [N]
  reward: jax.Array      # [N] 1.0 iff tau_after > tau_before
  adapters: Any          # the N trained LoRAs (leading copy axis)


def copy_sft_step(model: nn.Module, cfg, params, model_state, learning_rate,
                  carry, batch):
  """One Adam step of an isolated copy's LoRA on `batch` = (tokens [B, L],
  mask [B, L], active []): carry = (adapter, Adam state) -> (new carry,
  None); an inactive step returns `carry` unchanged."""
  tokens_BxL, mask_BxL, active = batch
  adapter, opt_state = carry
  grads = jax.grad(lambda a: sft_loss(model, params, model_state, tokens_BxL,
                                      mask_BxL, a, cfg))(adapter)
  updates, new_opt_state = optax.adam(learning_rate).update(
      grads, opt_state, adapter)
  new = (optax.apply_updates(adapter, updates), new_opt_state)
  return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry), None


def fit_copy(model: nn.Module, cfg, params, model_state, key,
             data: CopyData):
  """A fresh LoRA from `key` after one Adam step per active step of `data`
  (one copy's, no leading axis)."""
  adapter = lora.init(params, cfg.lora, key)
  step = functools.partial(copy_sft_step, model, cfg, params, model_state,
                           data.learning_rate)
  (adapter, _), _ = jax.lax.scan(
      step, (adapter, optax.adam(data.learning_rate).init(adapter)),
      (data.tokens, data.mask, data.active))
  return adapter


def isolated_copy(model: nn.Module, cfg, params, model_state, key,
                  data: CopyData, items):
  """One dream's isolated evaluation: (tau before, tau after, trained LoRA)."""
  copy_tau = lambda a: tau(model, params, model_state, items, cfg.tau, a, cfg)
  # b = 0: the fresh copy is the base model, so tau before needs no LoRA.
  before = copy_tau(None)
  adapter = fit_copy(model, cfg, params, model_state, key, data)
  return before, copy_tau(adapter), adapter


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate(model, cfg, params, model_state, keys, data, items):
  one = lambda xs: isolated_copy(model, cfg, params, model_state, *xs)
  n = keys.shape[0]
  before, after, adapters = jax.lax.map(
      one, (keys, data, items), batch_size=cfg.chunk_size or n)
  return Evaluation(before, after, (after > before).astype(jnp.float32),
                    adapters)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fit_copies(model, cfg, params, model_state, keys, data):
  one = lambda xs: fit_copy(model, cfg, params, model_state, *xs)
  return jax.lax.map(one, (keys, data),
                     batch_size=cfg.chunk_size or keys.shape[0])


def fit_copies(model: nn.Module, cfg, params, model_state, rng,
               data: CopyData):
  """N fresh LoRAs, copy i trained on its own `data[i]` only, in one
  compiled program (vmap, `cfg.chunk_size` lanes at a time): the batched
  LoRAs (leading copy axis). `cfg` needs `.lora` and `.chunk_size`."""
  data = CopyData(*(jnp.asarray(x) for x in data))
  return _fit_copies(model, cfg, params, model_state,
                     copy_keys(rng, data.tokens.shape[0]), data)


def copy_keys(rng, n: int):
  """The key of isolated copy i is fold_in(rng, i), batched or looped."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))


def evaluate(model: nn.Module, cfg, params, model_state, rng, data: CopyData,
             items) -> Evaluation:
  """All N isolated copies in one compiled program (vmap, `chunk_size` lanes
  at a time). `data` (`dream_copies` for text dreams) and the `items`
  arrays ([N, Q, L]) are per copy."""
  n = data.tokens.shape[0]
  items = {k: jnp.asarray(items[k]) for k in ('inputs', 'targets',
                                             'answer_mask')}
  data = CopyData(*(jnp.asarray(x) for x in data))
  return _evaluate(model, cfg, params, model_state, copy_keys(rng, n), data,
                   items)


# ---------------------------------------------------------------- SFT steps ---


def _batches(tokens, mask, steps: int, batch_size: int,
             host_rng: np.random.Generator):
  """[steps, batch, L] rows drawn with replacement: one shape whatever the
  number of rows, so the training scan compiles once."""
  idx = host_rng.choice(len(tokens), size=(steps, batch_size))
  return np.asarray(tokens)[idx], np.asarray(mask)[idx]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_generator(model, cfg, params, model_state, generator, tokens_SxBxL,
                     mask_SxBxL):
  tx = optax.adam(cfg.rest_learning_rate)

  def step(carry, batch):
    adapter, opt_state = carry
    loss_fn = lambda a: sft_loss(model, params, model_state, *batch, a, cfg)
    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return (optax.apply_updates(adapter, updates), opt_state), loss

  (generator, _), losses = jax.lax.scan(
      step, (generator, tx.init(generator)), (tokens_SxBxL, mask_SxBxL))
  return generator, losses


def train_generator(model, cfg, params, model_state, generator,
                    tokens, mask, host_rng):
  """ReST-EM's M-step: `rest_steps` Adam steps of the dream LoRA on rows
  (prompt ++ rewarded dream, loss on the dream) drawn with replacement.
  Returns (generator, last loss)."""
  if cfg.rest_steps == 0:
    return generator, float('nan')
  batches = _batches(tokens, mask, cfg.rest_steps, cfg.rest_batch_size, host_rng)
  generator, losses = _train_generator(model, cfg, params, model_state,
                                       generator, *batches)
  return generator, float(np.asarray(losses)[-1])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rehearse(model, cfg, level, params, model_state, slots_E, batches,
              anchor=None):
  trainable = cms.level_params(growth.expert_mask(params, level, slots_E),
                               level)
  # Adam state only for the expert leaves: the level's dense expert (the
  # backbone MLP of a pretrained model) never trains here.
  tx = growth.masked_optimizer(optax.adam(cfg.rehearse_learning_rate),
                               trainable)
  # The replay term's teacher: the model before rehearsal, or the anchor
  # (params, model_state) - traced inputs, so a new anchor each sleep is
  # new data, and its expert masks may differ from the student's.
  teacher = variables(*((params, model_state) if anchor is None else anchor))

  def loss_fn(tree, batch):
    student = cms.with_level_params(params, tree)
    loss = sft_loss(model, student, model_state, batch['tokens'], batch['mask'])
    if 'replay_tokens' in batch:
      tokens = batch['replay_tokens']
      logits = model.apply(variables(student, model_state), tokens)
      kept = model.apply(teacher, tokens)
      loss += cfg.rehearse_replay * forward_kl(logits, kept,
                                               batch['replay_mask'])
    return loss

  def step(carry, batch):
    tree, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(tree, batch)
    grads = growth.mask_tree(grads, trainable)
    updates, opt_state = tx.update(grads, opt_state, tree)
    return (growth.apply_masked_updates(tree, updates, trainable),
            opt_state), loss

  tree = cms.level_params(params, level)
  (tree, _), losses = jax.lax.scan(step, (tree, tx.init(tree)), batches)
  return cms.with_level_params(params, tree), losses


def rehearse(model: nn.Module, cfg, params, model_state,
             tokens, mask, *, level: int, slots, host_rng, replay=None,
             anchor=None):
  """`rehearse_steps` Adam steps (one compiled scan) on accepted dream rows,
  training only the expert `slots` of `level` (those unlocked in this
  sleep): every other parameter stays bit-identical. With `replay` rows
  ({'tokens', 'mask'}), each step adds `rehearse_replay` * KL(A || model)
  on a batch of them, where A is `anchor` = (params, model_state) when
  given, else the model before rehearsal. Returns (params, the per-step
  losses)."""
  if cfg.rehearse_steps == 0:
    return params, np.zeros((0,), np.float32)
  slots_E = np.zeros(model_state[cms.CMS_COLLECTION][cms.level_name(level)]
                     .shape, bool)
  slots_E[list(slots)] = True
  steps, size = cfg.rehearse_steps, cfg.rehearse_batch_size
  batches = dict(zip(('tokens', 'mask'),
                     _batches(tokens, mask, steps, size, host_rng)))
  replaying = replay is not None and cfg.rehearse_replay > 0
  if replaying:
    batches.update(zip(('replay_tokens', 'replay_mask'),
                       _batches(replay['tokens'], replay['mask'], steps, size,
                                host_rng)))
  # Without the replay term the anchor has no use: leave it out of the
  # program.
  params, losses = _rehearse(model, cfg, level, params, model_state,
                             jnp.asarray(slots_E), batches,
                             anchor if replaying else None)
  losses = np.asarray(losses)
  metrics_lib.check_finite(steps, {'rehearse_loss': losses[-1]})
  return params, losses


def self_replay(model: nn.Module, cfg, params, model_state,
                rng, *, bos_id: int, eos_id: int, pad_id: int, anchor=None):
  """`replay_samples` continuations of BOS by the model before rehearsal (or
  by `anchor` = (params, model_state) when given: `rehearse`'s teacher), as
  SFT rows: what it already knows, replayed so that training the new
  expert on dreams does not overwrite it (generative replay)."""
  if anchor is not None:
    params, model_state = anchor
  prompts = np.full((cfg.replay_samples, 1), bos_id, np.int32)
  out = sampling.sample(
      model, params, prompts, np.ones((cfg.replay_samples,), np.int32),
      max_new_tokens=cfg.max_new_tokens, rng=rng, temperature=cfg.temperature,
      top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id,
      model_state=model_state)
  tokens, mask = dream_rows(out.tokens, out.lengths, bos_id=bos_id,
                            pad_id=pad_id)
  return {'tokens': np.asarray(tokens), 'mask': np.asarray(mask)}


def colocate(adapter, params):
  """The adapter on the devices of `params` (replicated), so every call of a
  step sees the same placement and nothing recompiles."""
  leaf = jax.tree.leaves(params)[0]
  if not isinstance(leaf, jax.Array) or not leaf.committed:
    return adapter
  placement = leaf.sharding
  if isinstance(placement, jax.sharding.NamedSharding):
    placement = jax.sharding.NamedSharding(placement.mesh,
                                           jax.sharding.PartitionSpec())
  return sharding_lib.put(adapter, placement)
