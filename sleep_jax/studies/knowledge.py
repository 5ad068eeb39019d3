"""The knowledge-incorporation table: SQuAD passages, SEAL's protocol.

A model reads a passage and is later asked questions about it without the
passage in context (closed book). Rows, all on the same backbone (a
pretrained model with small fast CMS levels, `knowledge_qa.load_backbone`),
the same passages and the same graders:

* `base`: no context, no update. `in_context`: the passage in the prompt
  (an upper reference; it must beat `base`, else the prompts or the grader
  are broken).
* `passage_finetune`: a fresh LoRA fine-tuned on the passage.
* `implications_finetune`: a LoRA on the passage plus the model's own
  implications of it (no RL).
* `seal`: the same, with the implications written by a generator LoRA that
  ReST-EM trained on the *training* passages (reward: a LoRA copy fine-tuned
  on one self-edit answers that passage's questions with a higher gold
  log-probability; SEAL, Zweiger et al. 2025).
* `sleep`: wake (the fast CMS level learns the passage online), Knowledge
  Seeding into a new expert of the slowest level (the backbone MLP's level),
  then dreaming: the Sleep generator (ReST-EM on the training passages, with
  random-expert injection and gradient selection) writes dreams about the
  passage, the gradient-selected ones are rehearsed into the new expert.
  `sleep_no_dreaming` stops after consolidation; `sleep_no_gradient_selection`
  and `sleep_no_random_expert` are the dreaming ablations (their generators
  are trained with the same ablation); `sleep_levels` is Sleep on a backbone
  with more fast levels (`levels_fast_levels`), consolidated level by level.

Regimes: `single` (each evaluated passage adapted alone from the same
starting model: LoRA copies are trained in one vmapped program, Sleep's are
run one after another, each from the starting model) and `cpt` (every
passage's update in one model, then every question). Graders: SQuAD's
normalised exact match and token F1, and a semantic judge
(`sleep_jax.rewards`, pluggable).

Evaluation questions reach no training, reward or selection signal: rewards
are computed on the training passages' questions only, and test-time
dreaming (`dreaming.dream_unrewarded`) never reads items.

results.json is rewritten after each unit (a row group, regime and seed);
a re-run in the same workdir with the same config and backbone keeps the
units it holds, so a crash loses at most the unit in progress. The trained
generator LoRAs are saved under generators/ and restored.

This module runs the units and keeps results.json. Beside it:
`knowledge_setup` (the table's rows, regimes and graders, the config
checks, the shared setup, grading), `knowledge_rows` (each row's program,
one unit at a time), `knowledge_qa` (the backbone, prompts and answers),
`knowledge_report` (report.md and plots/) and `knowledge_plan` (`--plan`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import metrics as metrics_lib
from sleep_jax.models import lora
from sleep_jax.studies import knowledge_qa as qa
from sleep_jax.studies import results as results_lib
from sleep_jax.studies.knowledge_rows import run_unit
from sleep_jax.studies.knowledge_rows import train_generator
# The table and the setup live in knowledge_setup. knowledge_report and the
# tests read ROWS, REGIMES, GRADERS, setup and validate_config from here
# (validate_config: every study module has its config check).
from sleep_jax.studies.knowledge_setup import DETERMINISTIC
from sleep_jax.studies.knowledge_setup import GRADERS
from sleep_jax.studies.knowledge_setup import PAPER
from sleep_jax.studies.knowledge_setup import REGIMES
from sleep_jax.studies.knowledge_setup import ROWS
from sleep_jax.studies.knowledge_setup import Setup
from sleep_jax.studies.knowledge_setup import setup
from sleep_jax.studies.knowledge_setup import validate_config  # noqa: F401

# -------------------------------------------------------------------- run ---


def _units(config) -> list[tuple[str, str, int | None]]:
  """(group, regime, seed) units in run order; a group makes one or more
  rows."""
  rows, units = list(config.rows), []
  for row in DETERMINISTIC:
    if row in rows:
      units.append((row, 'both', None))
  groups = [r for r in ('passage_finetune', 'implications_finetune', 'seal')
            if r in rows]
  if any(r.startswith('sleep') and r != 'sleep_levels' for r in rows):
    groups.append('sleep')
  if 'sleep_levels' in rows:
    groups.append('sleep_levels')
  for seed in config.seeds:
    for group in groups:
      for regime in config.regimes:
        units.append((group, regime, int(seed)))
  return units


def unit_name(group: str, regime: str, seed: int | None) -> str:
  return f'{group}/{regime}' + ('' if seed is None else f'/{seed}')


def summarise(config, units: dict) -> dict:
  """rows[row][regime] = {grader: mean, grader_std: std, seeds: n}."""
  rows = {}
  for name, unit in units.items():
    group, regime = name.split('/')[:2]
    for row, scores in unit['rows'].items():
      for reg in (REGIMES if regime == 'both' else (regime,)):
        rows.setdefault(row, {}).setdefault(reg, []).append(scores)
  out = {}
  for row in ROWS:
    for regime in config.regimes:
      runs = rows.get(row, {}).get(regime)
      if not runs:
        continue
      entry = {'seeds': len(runs)}
      for g in GRADERS:
        values = [r[g] for r in runs if g in r]
        if values:
          entry[g] = float(np.mean(values))
          entry[f'{g}_std'] = float(np.std(values))
      out.setdefault(row, {})[regime] = entry
  return out


class _Generators:
  """ReST-EM generator LoRAs per (name, seed): trained once, saved under
  workdir/generators (numpy archives), restored on a re-run."""

  def __init__(self, s: Setup, workdir: str, log):
    self.s, self.dir, self.log = s, os.path.join(workdir, 'generators'), log
    self.cache, self.rounds = {}, {}

  def get(self, name: str, cfg: dreaming.DreamingConfig, seed: int,
          backbone=None):
    key = (name, seed)
    if key in self.cache:
      return self.cache[key]
    digest = results_lib.config_hash(results_lib.as_json(
        dataclasses.asdict(cfg)))
    path = os.path.join(self.dir, f'{name}-{seed}-{digest}.npz')
    b = backbone or self.s.backbone
    template = lora.init(b.params, cfg.lora, jax.random.key(0))
    if os.path.exists(path):
      with np.load(path) as f:
        generator = {k: {'a': f[f'{k}::a'], 'b': f[f'{k}::b']}
                     for k in template}
      self.log(f'[{name} seed {seed}] generator restored from {path}')
    else:
      t0 = time.perf_counter()
      generator, rounds = train_generator(
          self.s, cfg, jax.random.key(seed + 1000), seed,
          lambda m: self.log(f'[{name} seed {seed}] {m}'), backbone=b)
      generator = jax.device_get(generator)
      os.makedirs(self.dir, exist_ok=True)
      flat = {f'{k}::{f}': v[f] for k, v in generator.items() for f in 'ab'}
      np.savez(path + '.partial.npz', **flat)
      os.replace(path + '.partial.npz', path)
      self.rounds[f'{name}/{seed}'] = rounds
      self.log(f'[{name} seed {seed}] generator trained in '
               f'{time.perf_counter() - t0:.0f}s')
    self.cache[key] = generator
    return generator


def run(config, workdir: str, log: Callable[[str], None] = print) -> dict:
  t_start = time.perf_counter()
  s = setup(config)
  os.makedirs(workdir, exist_ok=True)
  fingerprint = results_lib.fingerprint(s.backbone.params,
                                        s.backbone.model_state)
  results_path = os.path.join(workdir, 'results.json')
  earlier = results_lib.earlier_results(results_path, config, ('seeds',),
                                        {'backbone': fingerprint})
  done = dict((earlier or {}).get('units', {}))
  levels = None
  if 'sleep_levels' in config.rows:
    levels = qa.load_backbone(config.backbone, config.levels_fast_levels,
                              config.slow_level)
  results = {'config': config.to_dict(), 'backbone': fingerprint,
             'passages': {'train': [p.id for p in s.train],
                          'eval': [p.id for p in s.eval],
                          'questions': len(s.questions(s.eval))},
             'paper': {k: list(v) for k, v in PAPER.items()}, 'units': {},
             'stages': {}, 'generator_rounds': {}}
  generators = _Generators(s, workdir, log)
  units = _units(config)
  progress = metrics_lib.Progress(len(units), what='unit')
  for i, (group, regime, seed) in enumerate(units):
    name = unit_name(group, regime, seed)
    if name in done:
      results['units'][name] = done[name]
      log(f'[{name}] kept from {results_path}')
    else:
      t0, c0 = time.perf_counter(), metrics_lib.compile_seconds()
      rows, stages = run_unit(s, group, regime, seed, generators,
                              lambda m, n=name: log(f'[{n}] {m}'), levels)
      compiling = metrics_lib.compile_seconds() - c0
      results['units'][name] = {'rows': rows, 'stages': stages,
                                'seconds': time.perf_counter() - t0,
                                'compile_seconds': compiling}
      line = ', '.join(f"{row} f1 {v['f1']:.3f}" for row, v in rows.items())
      log(f'[{name}] {line} ({time.perf_counter() - t0:.0f}s, '
          f'{compiling:.0f}s of it compiling)')
    results['rows'] = summarise(config, results['units'])
    results['generator_rounds'].update(generators.rounds)
    results['seconds'] = time.perf_counter() - t_start
    metrics_lib.write_json(results_path, results)
    progress.update(i + 1, {}, force=True)
  from sleep_jax.studies import knowledge_report  # pylint: disable=g-import-not-at-top
  knowledge_report.write(results, workdir)
  log(f'wrote {results_path}, report.md and plots/ in {workdir}')
  return results
