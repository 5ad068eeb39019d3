"""The CMS wake study: do online fast levels remember facts from a stream?

1. A world of fictional people (sleep_jax.studies.facts). A tiny CMS LM is
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

Writes results.json (accuracy matrices per method, after each method, and
`base_recall`: the base model's recall of the base population before any
method) and prints a table. The base model is saved in workdir/base/<hash of
the config apart from `methods`>. Re-running in the same workdir (after a
crash, or with other methods) reuses it and keeps every method that
results.json already holds for the same settings and the same base model
(`base_model`: its arrays' hash, backend and matmul precision; and
`base_recall`); earlier methods not asked for stay under `other_methods`.
An earlier results.json of other settings or another base model is renamed
to results.json.earlier-<time>, never overwritten. The code is not
compared: after changing it, use a new workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import sharding
from sleep_jax import wake
from sleep_jax.models import Transformer, TransformerConfig
from sleep_jax.studies import fact_world
from sleep_jax.studies import facts
from sleep_jax.studies import results as results_lib

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


def _live_through_stream(method, model, params, model_state, config, sessions,
                         evals, wake_step, wake_shardings):
  """Accuracy matrix [session][session'] and base accuracy per session."""
  params, model_state = jax.tree.map(jnp.copy, (params, model_state))
  if method == 'online':
    for level in wake.wake_levels(model.config):
      params, model_state, _ = growth.grow(
          params, model_state, level, jax.random.key(config.seed + level))
    ws = sharding.put(
        wake.init_wake_state(model.config, params, model_state), wake_shardings)
  rng = np.random.default_rng(config.seed + 1)
  acc, base_acc = [], []
  steps = int(config.stream.steps_per_session)
  for s, data in enumerate(sessions):
    if method == 'online':
      for t, batch in enumerate(fact_world.batches(
          data, config.stream.batch_size, steps, rng)):
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
  world = fact_world.build(config)
  sessions = [world.passages(group) for group in world.sessions]
  evals = [world.recall(group) for group in world.sessions]
  evals.append(world.recall(world.base))
  stream = config.stream
  length = world.seq_len

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = Transformer(model_config)
  params, model_state = fact_world.restore_or_train(
      fact_world.base_dir(workdir, config, ('methods',)),
      lambda: fact_world.train_base(model, config, world.passages(world.base),
                                    mesh, rules))
  example = jnp.zeros((stream.batch_size, length), jnp.int32)
  wake_shardings = wake.wake_state_shardings(model, mesh, rules, example)
  wake_step = wake.compile_wake_step(model, wake_shardings, mesh, rules)

  results = {'base_model': results_lib.fingerprint(params, model_state),
             'base_recall': eval_lib.recall_accuracy(model, params,
                                                     model_state, evals[-1]),
             'methods': {}, 'config': config.to_dict()}
  results_path = os.path.join(workdir, 'results.json')
  earlier = results_lib.earlier_results(
      results_path, config, ('methods',),
      {k: results[k] for k in ('base_model', 'base_recall')}) or {}
  done = {**earlier.get('other_methods', {}), **earlier.get('methods', {})}
  # Earlier methods of this base not asked for now stay in the file, apart.
  other_methods = lambda: {m: r for m, r in done.items()
                           if m not in results['methods']}
  results['other_methods'] = other_methods()
  for method in config.methods:
    if method in done:
      results['methods'][method] = done[method]
      results['other_methods'] = other_methods()
      metrics_lib.write_json(results_path, results)
      print(f'[{method}] kept from {results_path}', flush=True)
      continue
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
    results['other_methods'] = other_methods()
    results['seconds'] = time.perf_counter() - t_start
    metrics_lib.write_json(results_path, results)  # a later crash keeps it
  results['seconds'] = time.perf_counter() - t_start
  metrics_lib.write_json(results_path, results)
  print('method   | recall, earlier sessions | recall, all sessions | base',
        flush=True)
  for method, r in results['methods'].items():
    earlier = r['final_recall_earlier_sessions']
    print(f'{method:8s} | {earlier if earlier is None else round(earlier, 3)!s:24s} '
          f'| {r["final_recall_all_sessions"]:.3f}                | '
          f'{r["base_acc"][-1]:.3f}', flush=True)
  return results
