"""The Knowledge Seeding study: does consolidation move knowledge upward?

1. A world of fictional people (sleep_jax.studies.fact_world). A tiny CMS LM (a fast
   level 0 and a slow level 1) is trained on a base population.
2. Wake: one session of new people arrives; a low-rank expert grown in the
   fast level learns their passages online (sleep_jax.wake; the dense MLPs
   stay frozen). This model is the teacher: it knows the new facts, in its
   fast level only.
3. Sleep: for each setting of the knobs in `config.sweep`,
   `seeding.consolidate` builds the student (fast experts cleared, one new
   expert in level 1) and runs Knowledge Seeding on prompts drawn from the
   session's passages (the replay buffer) and from BOS.
4. Closed-book recall ("<Name> lives in" -> city etc.) on the new people and
   on the base population, for the teacher, the student before seeding (its
   no-knowledge level) and the student after seeding.

Writes results.json (after each run) and prints a table. The base model is
saved in workdir/base/<hash of the config apart from sleep, sweep and
wake_steps>. Re-running in the same workdir (after a crash, or with other
runs) reuses it and keeps every run that results.json already holds for the
same settings, the same base model (`base_model`: its arrays' hash, backend
and matmul precision) and the same teacher and student recall before
seeding; earlier runs not asked for stay under `other_runs`. An earlier
results.json of other settings or another base model is renamed to
results.json.earlier-<time>, never overwritten. The code is not compared:
after changing it, use a new workdir. `recovered` is the student's
new-fact recall after seeding over the teacher's; `base_vs_teacher` /
`base_vs_before` the change of base recall against the teacher and against
the student before seeding.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import sharding
from sleep_jax import wake
from sleep_jax.models import Transformer, TransformerConfig
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import fact_world
from sleep_jax.studies import results as results_lib


def validate_config(config) -> tuple[TransformerConfig, list[seeding.SeedingConfig]]:
  """Model config and one SeedingConfig per sweep entry; fails before compiling."""
  model_config = TransformerConfig.from_dict(config.model, key='model')
  if model_config.mlp != 'cms' or len(model_config.cms_levels) < 2:
    raise ValueError('the seeding study needs a CMS model with >= 2 levels '
                     "(model.mlp='cms', model.cms_levels=[fast, slow]).")
  wake.check_config(model_config)
  for key in ('base_people', 'people_per_session', 'batch_size'):
    if int(config.stream[key]) < 1:
      raise ValueError(f'stream.{key}={config.stream[key]} must be >= 1.')
  if int(config.wake_steps) < 1:
    raise ValueError(f'wake_steps={config.wake_steps} must be >= 1.')
  base = seeding.SeedingConfig.from_dict(config.sleep.to_dict())
  runs = [with_overrides(base, overrides, f'sweep[{i}]')
          for i, overrides in enumerate(config.sweep)]
  return model_config, runs or [base]


def _wake_teacher(model, params, model_state, config, data, mesh, rules):
  """Grows a fast expert and trains it on the session (the teacher)."""
  params, model_state, _ = growth.grow(params, model_state, 0,
                                       jax.random.key(config.seed + 1))
  example = jnp.zeros((config.stream.batch_size, config.data.seq_len), jnp.int32)
  shardings = wake.wake_state_shardings(model, mesh, rules, example)
  step = wake.compile_wake_step(model, shardings, mesh, rules)
  state = sharding.put(wake.init_wake_state(model.config, params, model_state),
                         shardings)
  steps = int(config.wake_steps)
  rng = np.random.default_rng(config.seed + 2)
  for t, batch in enumerate(fact_world.batches(data, config.stream.batch_size,
                                               steps, rng)):
    state, _ = step(state, batch, t == steps - 1)
  return state.params, state.model_state


def _label(cfg: seeding.SeedingConfig) -> str:
  return (f'alpha={cfg.alpha:g} lmbda={cfg.lmbda:g} gamma={cfg.gamma:g} '
          f'steps={cfg.num_steps}')


def run(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  model_config, runs = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  world = fact_world.build(config)
  session = world.sessions[0]
  passages = world.passages(session)
  evals = {'new': world.recall(session), 'base': world.recall(world.base)}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = Transformer(model_config)
  params, model_state = fact_world.restore_or_train(
      fact_world.base_dir(workdir, config, ('sleep', 'sweep', 'wake_steps')),
      lambda: fact_world.train_base(model, config, world.passages(world.base),
                                    mesh, rules))
  teacher = _wake_teacher(model, params, model_state, config, passages, mesh,
                          rules)
  recall = lambda p, s: {k: eval_lib.recall_accuracy(model, p, s, v)
                         for k, v in evals.items()}
  cleared = growth.reset(*teacher, 0, growth.active_slots(teacher[1], 0))
  results = {'teacher': recall(*teacher), 'student_before': recall(*cleared),
             'base_model': results_lib.fingerprint(params, model_state),
             'chance': 1.0 / 12, 'runs': [], 'config': config.to_dict()}
  results_path = os.path.join(workdir, 'results.json')
  earlier = results_lib.earlier_results(
      results_path, config, ('sweep', 'sleep'),
      {k: results[k] for k in ('base_model', 'teacher', 'student_before')}
  ) or {}
  done = earlier.get('runs', []) + earlier.get('other_runs', [])
  print(f"teacher recall: new {results['teacher']['new']:.3f}, base "
        f"{results['teacher']['base']:.3f}; student before seeding: new "
        f"{results['student_before']['new']:.3f}, base "
        f"{results['student_before']['base']:.3f}", flush=True)
  replay = {'tokens': passages['inputs'],
            'lengths': passages['mask'].sum(axis=1).astype(np.int32)}
  tok = world.tokenizer
  results['other_runs'] = done
  judges = {}
  for cfg in runs:
    label = _label(cfg)
    settings = results_lib.as_json(dataclasses.asdict(cfg))
    kept = results_lib.kept_run(done, 'sleep', settings)
    if kept:
      results['runs'].append(dict(kept, label=label))
      results['other_runs'] = results_lib.runs_not_asked(
          done, results['runs'], 'sleep')
      results['seconds'] = time.perf_counter() - t_start
      metrics_lib.write_json(results_path, results)
      print(f'[{label}] kept from {results_path}', flush=True)
      continue
    judge = (cfg.judge, cfg.judge_threshold)
    if judge not in judges:
      judges[judge] = rewards.make_judge(
          cfg.judge, threshold=cfg.judge_threshold, teacher=(model, *teacher),
          tokenizer=tok)
    t0 = time.perf_counter()
    out = seeding.consolidate(
        model, *teacher, level=1, replay=replay, cfg=cfg,
        rng=jax.random.key(config.seed + 3), bos_id=tok.bos_id,
        eos_id=tok.eos_id, pad_id=tok.pad_id, judge=judges[judge],
        decode=tok.decode, mesh=mesh, rules=rules)
    after = recall(out.params, out.model_state)
    entry = {'sleep': settings, 'label': label,
             'recall': after,
             'recovered': after['new'] / max(results['teacher']['new'], 1e-9),
             'base_vs_teacher': after['base'] - results['teacher']['base'],
             'base_vs_before': after['base'] - results['student_before']['base'],
             'seconds': time.perf_counter() - t0,
             'final_metrics': out.metrics[-1]}
    results['runs'].append(entry)
    results['other_runs'] = results_lib.runs_not_asked(
        done, results['runs'], 'sleep')
    results['seconds'] = time.perf_counter() - t_start
    metrics_lib.write_json(results_path, results)  # a later crash keeps it
    print(f"[{entry['label']}] new {after['new']:.3f} "
          f"({100 * entry['recovered']:.0f}% of teacher), base "
          f"{after['base']:.3f} ({100 * entry['base_vs_teacher']:+.1f} pts vs "
          f"the teacher), "
          f"{entry['seconds']:.0f}s", flush=True)
  print(f"{'setting':38s} | new recall | % of teacher | base recall")
  for r in results['runs']:
    print(f"{r['label']:38s} | {r['recall']['new']:.3f}      | "
          f"{100 * r['recovered']:5.0f}%       | {r['recall']['base']:.3f}")
  return results
