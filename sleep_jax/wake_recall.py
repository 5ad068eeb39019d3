"""The CMS wake study: do online fast levels remember facts from a stream?

1. A world of fictional people (sleep_jax.data.tasks.facts). A tiny CMS LM is
   trained on passages about a base population, so it knows the language of
   the world but none of the people who arrive later.
2. Sessions of new people arrive. Each method lives through the same stream:
   * `frozen`: the MLP levels never change (what a plain transformer keeps
     without the passages in context: nothing);
   * `online`: the CMS wake update (sleep_jax.wake) on the session's
     passages, each level at its own chunk size; one low-rank expert is grown
     per wake level at the start.
3. After every session: closed-book recall ("<Name> lives in" -> city) on the
   people of every session so far, and on the base population.

Writes results.json (accuracy matrices per method) and prints a table.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import sharding
from sleep_jax import training
from sleep_jax import wake
from sleep_jax.data import pipeline
from sleep_jax.data.tasks import facts
from sleep_jax.data.tokenizers import SentencePieceTokenizer
from sleep_jax.models import Transformer, TransformerConfig

METHODS = ('frozen', 'online')


def validate_config(config) -> TransformerConfig:
  model_config = TransformerConfig.from_dict(config.model, key='model')
  if model_config.mlp != 'cms':
    raise ValueError(f"model.mlp={model_config.mlp!r}: the wake study needs a "
                     "CMS model (model.mlp='cms').")
  wake.check_config(model_config)
  for key in ('base_people', 'sessions', 'people_per_session',
              'steps_per_session', 'batch_size'):
    if int(config.stream[key]) < 1:
      raise ValueError(f'stream.{key}={config.stream[key]} must be >= 1.')
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown:
    raise ValueError(f'methods={list(config.methods)} has unknown {unknown}; '
                     f'valid: {list(METHODS)}.')
  return model_config


def _encode_sentences(tokenizer, sentences, length):
  rows = [tokenizer.encode(s, add_bos=True, add_eos=True) for s in sentences]
  if max(map(len, rows)) > length + 1:
    raise ValueError(f'a sentence has {max(map(len, rows))} tokens; raise '
                     f'data.seq_len (now {length}).')
  examples = [pipeline.pad_document(np.asarray(row), length + 1,
                                    tokenizer.pad_id) for row in rows]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _batches(data, batch_size, steps, rng):
  n = len(data['inputs'])
  for _ in range(steps):
    idx = rng.choice(n, size=batch_size, replace=n < batch_size)
    yield {k: jnp.asarray(v[idx]) for k, v in data.items()}


def _train_base(model, config, data, mesh, rules):
  steps = int(config.base_train_steps)
  tx, schedule = training.make_optimizer(config.optimizer, steps)
  tokens = jnp.zeros((config.stream.batch_size, config.data.seq_len), jnp.int32)
  state, shardings = sharding.init_sharded(
      functools.partial(training.create_train_state, model, tx), mesh, rules,
      jax.random.key(config.seed), tokens)
  step = training.compile_train_step(model, tx, schedule, shardings, mesh, rules)
  progress = metrics_lib.Progress(steps, what='base step')
  rng = np.random.default_rng(config.seed)
  for i, batch in enumerate(_batches(data, config.stream.batch_size, steps, rng)):
    state, metrics = step(state, batch)
    if (i + 1) % 50 == 0 or i + 1 == steps:
      metrics_lib.check_finite(i + 1, {'loss': metrics['loss']})
    progress.update(i + 1, {'loss': metrics['loss']}, force=i + 1 == steps)
  return state.params, state.model_state


def _live_through_stream(method, model, params, model_state, config, sessions,
                         evals, wake_step, wake_shardings):
  """Accuracy matrix [session][session'] and base accuracy per session."""
  params, model_state = jax.tree.map(jnp.copy, (params, model_state))
  if method == 'online':
    for level in wake.wake_levels(model.config):
      params, model_state, _ = growth.grow(
          params, model_state, level, jax.random.key(config.seed + level))
    ws = jax.device_put(
        wake.init_wake_state(model.config, params, model_state), wake_shardings)
  rng = np.random.default_rng(config.seed + 1)
  acc, base_acc = [], []
  steps = int(config.stream.steps_per_session)
  for s, data in enumerate(sessions):
    if method == 'online':
      for t, batch in enumerate(_batches(data, config.stream.batch_size, steps,
                                         rng)):
        ws, _ = wake_step(ws, batch, t == steps - 1)
      params, model_state = ws.params, ws.model_state
    row = [eval_lib.recall_accuracy(model, params, model_state, evals[j])
           for j in range(s + 1)]
    acc.append(row + [None] * (len(sessions) - s - 1))
    base_acc.append(eval_lib.recall_accuracy(model, params, model_state,
                                             evals[-1]))
    print(f'[{method}] after session {s + 1}: recall per session '
          f'{[round(a, 3) for a in row]}, base {base_acc[-1]:.3f}', flush=True)
  return acc, base_acc


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the study; returns (and writes) the results."""
  t_start = time.perf_counter()
  model_config = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  stream = config.stream
  people = facts.make_people(
      stream.base_people + stream.sessions * stream.people_per_session,
      config.world_seed)
  base, new = people[:stream.base_people], people[stream.base_people:]
  groups = [new[i * stream.people_per_session:(i + 1) * stream.people_per_session]
            for i in range(stream.sessions)]
  tokenizer = SentencePieceTokenizer.train(
      [s for p in people for s in facts.all_sentences(p)],
      config.data.tokenizer_vocab_size)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but '
                     f'model.vocab_size={model_config.vocab_size}; raise it.')
  length = config.data.seq_len
  encode = lambda group: _encode_sentences(
      tokenizer, [s for p in group for s in facts.all_sentences(p)], length)
  items = lambda group: eval_lib.encode_items(
      tokenizer, [it for p in group for it in facts.recall_items(p)], length)
  sessions = [encode(g) for g in groups]
  evals = [items(g) for g in groups] + [items(base)]

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = Transformer(model_config)
  params, model_state = _train_base(model, config, encode(base), mesh, rules)
  example = jnp.zeros((stream.batch_size, length), jnp.int32)
  wake_shardings = wake.wake_state_shardings(model, mesh, rules, example)
  wake_step = wake.compile_wake_step(model, wake_shardings, mesh, rules)

  results = {'methods': {}, 'config': config.to_dict()}
  for method in config.methods:
    acc, base_acc = _live_through_stream(
        method, model, params, model_state, config, sessions, evals,
        wake_step, wake_shardings)
    last = acc[-1]
    results['methods'][method] = {
        'acc_matrix': acc, 'base_acc': base_acc,
        'final_recall_earlier_sessions': float(np.mean(last[:-1]))
        if len(last) > 1 else None,
        'final_recall_all_sessions': float(np.mean(last)),
        'chance': 1.0 / len(facts.ATTRIBUTES['city'])}
  results['seconds'] = time.perf_counter() - t_start
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  print('method   | recall, earlier sessions | recall, all sessions | base',
        flush=True)
  for method, r in results['methods'].items():
    earlier = r['final_recall_earlier_sessions']
    print(f'{method:8s} | {earlier if earlier is None else round(earlier, 3)!s:24s} '
          f'| {r["final_recall_all_sessions"]:.3f}                | '
          f'{r["base_acc"][-1]:.3f}', flush=True)
  return results
