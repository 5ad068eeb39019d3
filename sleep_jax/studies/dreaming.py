"""The dreaming study: can the model teach itself facts it only read?

1. A world of fictional people (sleep_jax.studies.fact_world). A tiny CMS LM learns
   the base population closed-book (one sentence per row, each repeated
   `stream.closed_book_repeats` times in the mix), and learns to
   *read*: documents about people met nowhere else (a passage, then one of
   its facts restated) can only be continued by copying from the passage.
   The slow level starts with `base_experts[1]` trained low-rank experts,
   so that random-expert injection has something to recombine.
2. A new expert is unlocked in the slow level, as consolidation leaves it.
3. Dreaming (sleep_jax.dreaming): the contexts are passages about a session
   of new people, tau is closed-book recall of their facts in the forms
   the passages use. The model dreams
   continuations of each passage, selects, scores every kept dream in an
   isolated LoRA copy (all vmapped), runs ReST-EM on its dream LoRA, then
   rehearses the accepted dreams into the new expert only. tau scores probe
   items only; recall is reported on held-out items
   (sleep_jax.studies.facts).
4. Closed-book recall of the new people and of the base population, before
   and after, and the fraction of rewarded dreams per ReST-EM round.

Each entry of `config.runs` (dreaming.* overrides, e.g. the ablations) starts
from the same base model. results.json (rewritten after each run) holds per
run the rounds, recall and examples of accepted dreams; a line per run is
printed, and dreaming.png plots them at the end. Re-running in the same
workdir (after a crash, or with other runs) restores the base model from
workdir/base/<hash of its config> and keeps every run that results.json
already holds for the same settings and the same base model (`base_model`:
its arrays' hash, backend and matmul precision); earlier runs not asked for
stay under `other_runs`. An earlier results.json of other settings or
another base model is renamed to results.json.earlier-<time>, never
overwritten. The code is not compared: after changing it, use a new
workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import sharding
from sleep_jax.models import Transformer, TransformerConfig
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import fact_world
from sleep_jax.studies import facts
from sleep_jax.studies import report
from sleep_jax.studies import results as results_lib


def validate_config(config):
  """(model config, [DreamingConfig per run]); fails before any compile."""
  model_config = TransformerConfig.from_dict(config.model, key='model')
  if model_config.mlp != 'cms':
    raise ValueError("the dreaming study rehearses into a CMS expert: set "
                     "model.mlp='cms'.")
  level = int(config.rehearse_level)
  num_levels = len(model_config.cms_levels)
  if len(config.base_experts) != num_levels or any(
      not 0 <= int(n) < lvl.num_experts for n, lvl in
      zip(config.base_experts, model_config.cms_levels)):
    raise ValueError(f'base_experts={list(config.base_experts)} needs one '
                     f'count per CMS level ({num_levels}), each below that '
                     "level's num_experts (a slot must stay free to grow).")
  if not 0 <= level < num_levels:
    raise ValueError(f'rehearse_level={level} must name a CMS level in '
                     f'[0, {len(model_config.cms_levels) - 1}].')
  for key in ('base_people', 'people_per_session', 'batch_size',
              'reading_people', 'closed_book_repeats'):
    if int(config.stream[key]) < 1:
      raise ValueError(f'stream.{key}={config.stream[key]} must be >= 1.')
  base = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  runs = [with_overrides(base, overrides, f'runs[{i}]')
          for i, overrides in enumerate(config.runs)] or [base]
  for i, cfg in enumerate(runs):
    where = f'dreaming (runs[{i}])' if config.runs else 'dreaming'
    if cfg.top_k > model_config.vocab_size:
      raise ValueError(f'{where}.top_k={cfg.top_k} exceeds model.vocab_size='
                       f'{model_config.vocab_size}; use 0 for no top-k filter.')
    if int(config.prompt_width) + cfg.max_new_tokens > model_config.max_len:
      raise ValueError(
          f'prompt_width={config.prompt_width} + {where}.max_new_tokens='
          f'{cfg.max_new_tokens} exceeds model.max_len={model_config.max_len}'
          ': lower one of them or raise model.max_len.')
  return model_config, runs


def make_tasks(world: fact_world.FactWorld, people, cfg: dreaming.DreamingConfig,
               prompt_width: int, seed: int) -> dreaming.Tasks:
  """One context per person: their passage; tau = recall of its probe
  items (forms the passages use). The held-out items that `run` reports
  never reach a reward."""
  rng = np.random.default_rng(seed)
  texts = [' '.join(facts.passages(p, rng)) for p in people]
  return dreaming.make_tasks(world.tokenizer, texts,
                             [world.probe([p]) for p in people], cfg.template,
                             prompt_width)


def _label(cfg: dreaming.DreamingConfig, base: dreaming.DreamingConfig) -> str:
  diff = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if getattr(cfg, f.name) != getattr(base, f.name)}
  return ' '.join(f'{k}={v}' for k, v in diff.items()) or 'default'


# Keys that do not decide the base model: any other change trains a new one.
_AFTER_BASE_KEYS = ('dreaming', 'runs', 'prompt_width', 'rehearse_level')


def _earlier_runs(results_path: str, config, results) -> list[dict]:
  """The runs of an earlier results.json in this workdir that can be kept:
  same settings apart from `runs` and `dreaming` (each run records its own
  DreamingConfig), the same base model (`results_lib.fingerprint`) and the
  same recall before dreaming. Any other earlier file is set aside whole,
  not overwritten."""
  earlier = results_lib.earlier_results(
      results_path, config, ('runs', 'dreaming'),
      {k: results[k] for k in ('base_model', 'before')})
  if earlier is None:
    return []
  return earlier.get('runs', []) + earlier.get('other_runs', [])


def run(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  model_config, runs = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  world = fact_world.build(config)
  session = world.sessions[0]
  # Every run's prompts before the base model trains: a prompt_width too
  # small for a template fails now, not minutes later.
  try:
    run_tasks = [make_tasks(world, session, cfg, int(config.prompt_width),
                            config.seed) for cfg in runs]
  except ValueError as e:
    raise ValueError(f'prompt_width={config.prompt_width}: {e}') from None
  evals = {'new': world.recall(session), 'base': world.recall(world.base)}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = Transformer(model_config)
  data_rng = np.random.default_rng(config.seed)
  readers = world.documents(
      facts.strangers(int(config.stream.reading_people),
                      {p.name for p in world.base + sum(world.sessions, [])},
                      config.world_seed),
      data_rng)
  closed_book = world.passages(world.base)
  repeats = int(config.stream.closed_book_repeats)
  data = {k: np.concatenate([closed_book[k]] * repeats + [readers[k]])
          for k in readers}
  params, model_state = fact_world.restore_or_train(
      fact_world.base_dir(workdir, config, _AFTER_BASE_KEYS),
      lambda: fact_world.train_base(
          model, config, data, mesh, rules,
          experts_per_level=[int(n) for n in config.base_experts]))
  base_model = results_lib.fingerprint(params, model_state)
  level = int(config.rehearse_level)
  params, model_state, slot = growth.grow(params, model_state, level,
                                          jax.random.key(config.seed + 1))
  recall = lambda p: {k: eval_lib.recall_accuracy(model, p, model_state, v)
                      for k, v in evals.items()}
  results = {'before': recall(params), 'base_model': base_model,
             'chance': 1.0 / 12, 'runs': [], 'config': config.to_dict()}
  results_path = os.path.join(workdir, 'results.json')
  done = _earlier_runs(results_path, config, results)
  print(f"before dreaming: new {results['before']['new']:.3f}, base "
        f"{results['before']['base']:.3f}", flush=True)
  base_cfg = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  tok = world.tokenizer
  results['other_runs'] = done
  for cfg, tasks in zip(runs, run_tasks):
    label = _label(cfg, base_cfg)
    settings = results_lib.as_json(dataclasses.asdict(cfg))
    earlier = results_lib.kept_run(done, 'dreaming', settings)
    if earlier:
      results['runs'].append(dict(earlier, label=label))
      results['other_runs'] = results_lib.runs_not_asked(
          done, results['runs'], 'dreaming')
      metrics_lib.write_json(results_path, results)
      print(f'[{label}] kept from {results_path}', flush=True)
      continue
    t0 = time.perf_counter()
    on_round = functools.partial(_print_round, label)
    out = dreaming.dream(model, cfg, params, model_state, tasks,
                         jax.random.key(config.seed + 2), level=level,
                         slots=[slot], bos_id=tok.bos_id, eos_id=tok.eos_id,
                         pad_id=tok.pad_id, seed=config.seed, on_round=on_round)
    after = recall(out.params)
    entry = {'dreaming': settings, 'label': label,
             'rounds': out.rounds, 'recall': after,
             'new_gain': after['new'] - results['before']['new'],
             'base_change': after['base'] - results['before']['base'],
             'accepted': len(out.accepted['tokens']),
             'accepted_examples': [
                 tok.decode([int(t) for t, m in zip(row[1:], mask[:-1]) if m])
                 for row, mask in zip(out.accepted['tokens'][:8],
                                      out.accepted['mask'][:8])],
             'seconds': time.perf_counter() - t0}
    results['runs'].append(entry)
    results['other_runs'] = results_lib.runs_not_asked(
        done, results['runs'], 'dreaming')
    results['seconds'] = time.perf_counter() - t_start
    metrics_lib.write_json(results_path, results)  # a later crash keeps it
    fractions = ' -> '.join(f"{r['reward_fraction']:.2f}" for r in out.rounds)
    print(f"[{label}] rewarded dreams per round {fractions or '-'}; new "
          f"{after['new']:.3f} ({100 * entry['new_gain']:+.1f} pts), base "
          f"{after['base']:.3f} ({100 * entry['base_change']:+.1f} pts), "
          f"{entry['seconds']:.0f}s", flush=True)
  results['seconds'] = time.perf_counter() - t_start
  metrics_lib.write_json(results_path, results)
  plot_path = os.path.join(workdir, 'dreaming.png')
  report.plot_dreaming(results, plot_path)
  print(f'wrote {results_path} and {plot_path}', flush=True)
  return results


def _print_round(label: str, stats: dict) -> None:
  print(f"[{label}] round {stats['round']}: {stats['rewarded']}/"
        f"{stats['kept']} kept dreams rewarded (tau {stats['tau_before']:.3f}"
        f" -> {stats['tau_after']:.3f})", flush=True)
