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
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import dream_sft
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import sharding as sharding_lib
from sleep_jax import wake as wake_lib
from sleep_jax.data.tasks import squad
from sleep_jax.models import lora
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import knowledge_qa as qa
from sleep_jax.studies import results as results_lib

ROWS = ('base', 'in_context', 'passage_finetune', 'implications_finetune',
        'seal', 'sleep', 'sleep_no_dreaming', 'sleep_no_gradient_selection',
        'sleep_no_random_expert', 'sleep_levels')
REGIMES = ('single', 'cpt')
GRADERS = ('exact', 'f1', 'semantic')
DETERMINISTIC = ('base', 'in_context')   # greedy answers, no update
# The Sleep paper's no-context SQuAD accuracy (%, single / CPT n=200; an
# LLM grader, Qwen-scale backbone): the report's side-by-side column.
PAPER = {'base': (31.9, 31.9), 'passage_finetune': (33.4, 32.0),
         'seal': (46.7, 43.2), 'sleep': (48.1, 44.3),
         'sleep_levels': (48.9, 46.2),
         'sleep_no_gradient_selection': (47.1, 45.2),
         'sleep_no_random_expert': (48.0, 44.7),
         'sleep_no_dreaming': (35.7, 36.2)}
# Rows computed together (one unit per regime and seed); a dreaming variant's
# DreamingConfig overrides.
SLEEP_VARIANTS = {'sleep': {}, 'sleep_no_gradient_selection':
                  {'selection': 'random'},
                  'sleep_no_random_expert': {'random_expert': False}}


@dataclasses.dataclass(frozen=True)
class LoraSft:
  """What `dream_sft.fit_copies` reads of a config."""
  lora: lora.LoraConfig
  chunk_size: int = 0


# ------------------------------------------------------------------ setup ---


@dataclasses.dataclass
class Setup:
  """Everything the rows share: the backbone, the passages, the graders."""
  config: Any
  backbone: qa.Backbone
  train: list
  eval: list
  judge: Any
  mesh: Any
  rules: Any

  @property
  def ids(self) -> dict:
    tok = self.backbone.tokenizer
    return {'bos_id': tok.bos_id, 'eos_id': tok.eos_id, 'pad_id': tok.pad_id}

  def questions(self, passages) -> list:
    return [q for p in passages for q in p.questions]


def _capped(passages, max_questions: int):
  return [dataclasses.replace(p, questions=p.questions[:max_questions])
          for p in passages]


def validate_config(config) -> None:
  """Fails before any model loads: unknown rows, regimes, sizes."""
  for key, valid in (('rows', ROWS), ('regimes', REGIMES)):
    bad = [x for x in config[key] if x not in valid]
    if bad or not config[key]:
      raise ValueError(f'{key}={list(config[key])}: {bad or "empty"}; valid: '
                       f'{list(valid)}.')
  if not config.seeds:
    raise ValueError('seeds is empty: give at least one seed, e.g. '
                     '--config.seeds="(0,1)".')
  for key in ('train_passages', 'eval_passages', 'max_questions'):
    if int(config.data[key]) < 1:
      raise ValueError(f'data.{key}={config.data[key]} must be >= 1.')
  seeding.SeedingConfig.from_dict(config.sleep.to_dict())
  base = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  with_overrides(base, config.seal.to_dict(), 'seal')
  if config.judge.name not in rewards.JUDGES:
    raise ValueError(f'judge.name={config.judge.name!r}; valid: '
                     f'{list(rewards.JUDGES)}.')


def setup(config) -> Setup:
  validate_config(config)
  backbone = qa.load_backbone(config.backbone, config.fast_levels,
                              config.slow_level)
  data = config.data
  passages = squad.load(data.path or None)
  train, evaluated = squad.split(passages, train=int(data.train_passages),
                                 eval=int(data.eval_passages),
                                 seed=int(data.split_seed))
  evaluated = _capped(evaluated, int(data.max_questions))
  judge = rewards.make_judge(config.judge.name,
                             threshold=config.judge.threshold)
  # One device: on N processes each runs the whole study on its own first
  # device (the same work, no collectives) and process 0 writes.
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                                jax.local_devices()[:1])
  return Setup(config, backbone, train, evaluated, judge, mesh,
               sharding_lib.DEFAULT_RULES)


# ---------------------------------------------------------------- grading ---


def grade(s: Setup, passages, predictions: list[str]) -> dict:
  """Mean of each grader over `passages`' questions, and the predictions."""
  questions = s.questions(passages)
  scores = squad.grade(predictions, [q.answers for q in questions], s.judge)
  out = {g: float(np.mean(scores[g])) for g in GRADERS if g in scores}
  out['predictions'] = {q.id: p for q, p in zip(questions, predictions)}
  return out


def answers(s: Setup, passages, params, model_state=None, *,
            in_context: bool = False, backbone=None) -> list[str]:
  backbone = backbone or s.backbone
  prompts = [qa.question_prompt(backbone, q.question,
                                p.context if in_context else None)
             for p in passages for q in p.questions]
  widths = s.config.widths
  return qa.answer(backbone, params, backbone.model_state
                   if model_state is None else model_state, prompts,
                   width=int(widths.in_context if in_context else widths.prompt),
                   max_new_tokens=int(s.config.answer.max_new_tokens),
                   batch_size=int(s.config.answer.batch_size))


# ----------------------------------------------------------- LoRA rows ---


def lora_sft(finetune) -> LoraSft:
  """The fine-tuning rows' LoRA, from the `finetune` config keys."""
  return LoraSft(lora.LoraConfig(int(finetune.lora_rank),
                                 float(finetune.lora_alpha),
                                 lora.hashable_targets(finetune.lora_targets)),
                 int(finetune.chunk_size))


def _copy_data(rows_list: list[dict], steps: int, batch_size: int,
               learning_rate: float, host: np.random.Generator):
  """One LoRA copy per entry of `rows_list` ({'inputs','targets','mask'}),
  `steps` Adam steps of `batch_size` rows drawn from its own rows."""
  tokens, masks = [], []
  for rows in rows_list:
    idx = host.integers(len(rows['inputs']), size=(steps, batch_size))
    # fit_copies reads whole rows (mask at positions that predict the next
    # token): BOS, then every target.
    full = np.concatenate([rows['inputs'][:, :1], rows['targets']], 1)
    mask = np.concatenate([rows['mask'], np.zeros_like(rows['mask'][:, :1])],
                          1)
    tokens.append(full[idx])
    masks.append(mask[idx])
  n = len(rows_list)
  return dream_sft.CopyData(np.stack(tokens), np.stack(masks),
                            np.full((n,), learning_rate, np.float32),
                            np.ones((n, steps), bool))


def _lora_row(s: Setup, regime: str, texts_per_passage: list[list[str]],
              rng, host) -> dict:
  """LoRA fine-tuning on each passage's texts (single: one copy per
  passage, vmapped; cpt: one copy on all), then closed-book answers."""
  ft, b = s.config.finetune, s.backbone
  cfg = lora_sft(s.config.finetune)
  width = int(s.config.widths.passage)
  rows = [qa.text_rows(b, texts, width) for texts in texts_per_passage]
  if regime == 'cpt':
    rows = [{k: np.concatenate([r[k] for r in rows]) for k in rows[0]}]
    steps = int(ft.cpt_steps)
  else:
    steps = int(ft.steps)
  data = _copy_data(rows, steps, int(ft.batch_size), float(ft.learning_rate),
                    host)
  adapters = dream_sft.fit_copies(b.model, cfg, b.params, b.model_state, rng,
                                  data)
  if regime == 'cpt':
    merged = lora.merge(b.params, lora.take(adapters, 0), cfg.lora)
    return grade(s, s.eval, answers(s, s.eval, merged))
  predictions = []
  for i, passage in enumerate(s.eval):
    merged = lora.merge(b.params, lora.take(adapters, i), cfg.lora)
    predictions += answers(s, [passage], merged)
  return grade(s, s.eval, predictions)


# ------------------------------------------------------------ self-edits ---


def edit_tasks(s: Setup, passages, *, with_items: bool,
               backbone: qa.Backbone | None = None) -> dreaming.Tasks:
  """Dreaming tasks: the self-edit prompt of each passage, the passage
  itself (BOS first, for the gradient score), and for training passages
  only the answer items tau scores."""
  b = backbone or s.backbone
  widths, tok = s.config.widths, b.tokenizer
  prompts = qa.pad([qa.encode(b, qa.self_edit_prompt(b, p.context))
                    for p in passages], int(widths.self_edit_prompt),
                   tok.pad_id, 'a self-edit prompt')
  contexts = qa.pad([tok.encode(p.context, add_bos=True)[:int(widths.passage)]
                     for p in passages], int(widths.passage), tok.pad_id,
                    'a passage')
  items = (qa.answer_items(b, passages, int(widths.item),
                           int(s.config.data.max_questions))
           if with_items else {})
  return dreaming.Tasks(*prompts, *contexts, items)


def self_edits(s: Setup, cfg: dreaming.DreamingConfig, generator, rng,
               backbone=None, params=None) -> list[list[str]]:
  """`cfg.num_dreams` self-edits per evaluated passage, as texts."""
  b = backbone or s.backbone
  tasks = edit_tasks(s, s.eval, with_items=False, backbone=b)
  tokens, lengths = dreaming.generate(
      b.model, b.params if params is None else params, b.model_state,
      generator, tasks, cfg, rng, eos_id=b.tokenizer.eos_id,
      pad_id=b.tokenizer.pad_id)
  tokens, lengths = jax.device_get((tokens, lengths))
  texts = [b.tokenizer.decode(tokens[i, :lengths[i]].tolist())
           for i in range(len(tokens))]
  m = cfg.num_dreams
  return [texts[i * m:(i + 1) * m] for i in range(len(s.eval))]


def train_generator(s: Setup, cfg: dreaming.DreamingConfig, rng, seed: int,
                    log: Callable[[str], None], backbone=None, params=None,
                    model_state=None):
  """ReST-EM on the training passages: (generator LoRA, per-round stats)."""
  b = backbone or s.backbone
  tasks = edit_tasks(s, s.train, with_items=True, backbone=b)
  generator, rounds, _ = dreaming.rest_em(
      b.model, cfg, b.params if params is None else params,
      b.model_state if model_state is None else model_state, tasks, rng,
      host_rng=np.random.default_rng(seed), **s.ids,
      on_round=lambda r: log(f"ReST-EM round {r['round']}: "
                             f"{r['rewarded']}/{r['kept']} self-edits "
                             f"rewarded"))
  return generator, rounds


# ------------------------------------------------------------------ sleep ---


_WAKE_STEPS = {}


def _wake_step(s: Setup, model, seq_len: int):
  """The compiled wake step, built once per (model, width, mesh): each
  passage of the single regime reuses it."""
  key = (model, seq_len, s.mesh, s.rules)
  if key not in _WAKE_STEPS:
    example = np.zeros((1, seq_len), np.int32)
    shardings = wake_lib.wake_state_shardings(model, s.mesh, s.rules, example)
    _WAKE_STEPS[key] = (wake_lib.compile_wake_step(model, shardings, s.mesh,
                                                   s.rules), shardings)
  return _WAKE_STEPS[key]


def wake(s: Setup, b: qa.Backbone, params, model_state, passages, rng):
  """Each fast level grows one expert; the fast levels then read the
  passages in order, `wake.steps` steps each (batch 1), online."""
  fast = [l for l, lvl in enumerate(b.model.config.cms_levels) if lvl.chunk_size]
  for i, level in enumerate(fast):
    params, model_state, _ = growth.grow(params, model_state, level,
                                         jax.random.fold_in(rng, i))
  width = int(s.config.widths.passage)
  rows = qa.text_rows(b, [p.context for p in passages], width)
  step, shardings = _wake_step(s, b.model, width)
  state = sharding_lib.put(
      wake_lib.init_wake_state(b.model.config, params, model_state), shardings,
      may_alias=False)
  steps = int(s.config.wake.steps)
  losses = []
  for p in range(len(passages)):
    batch = {k: v[p:p + 1] for k, v in rows.items()}
    for i in range(steps):
      last = p == len(passages) - 1 and i == steps - 1
      state, metrics = step(state, batch, last)
      losses.append(metrics['loss'])
  metrics_lib.check_finite(len(losses), {'wake_loss': float(losses[-1])})
  return state.params, state.model_state


def consolidate(s: Setup, b: qa.Backbone, params, model_state, passages, rng):
  """Knowledge Seeding level by level, fastest pair first, on prefixes of
  the passages; returns (params, model_state, the slowest level's new
  slots)."""
  cfg = seeding.SeedingConfig.from_dict(s.config.sleep.to_dict())
  tok = b.tokenizer
  width = int(s.config.widths.passage)
  replay = qa.pad([tok.encode(p.context, add_bos=True)[:width]
                   for p in passages], width, tok.pad_id, 'a passage')
  replay = {'tokens': replay[0], 'lengths': replay[1]}
  grown = []
  for level in range(1, len(b.model.config.cms_levels)):
    out = seeding.consolidate(
        b.model, params, model_state, level=level, replay=replay, cfg=cfg,
        rng=jax.random.fold_in(rng, level), judge=s.judge,
        decode=tok.decode, mesh=s.mesh, rules=s.rules, **s.ids)
    params, model_state, grown = out.params, out.model_state, out.grown_slots
  return params, model_state, grown


def _sleep_configs(s: Setup, rows) -> dict[str, dreaming.DreamingConfig]:
  base = dreaming.DreamingConfig.from_dict(s.config.dreaming.to_dict())
  return {name: dataclasses.replace(base, **over)
          for name, over in SLEEP_VARIANTS.items() if name in rows}


def sleep_unit(s: Setup, regime: str, rows, generators: dict, rng, seed: int,
               log, backbone=None) -> tuple[dict, dict]:
  """The Sleep rows of one regime and seed, and the per-stage scores
  (after wake, after consolidation, after dreaming)."""
  b = backbone or s.backbone
  configs = _sleep_configs(s, rows)
  groups = [[p] for p in s.eval] if regime == 'single' else [s.eval]
  predictions = {name: [] for name in ('after_wake', 'after_consolidation',
                                       *configs)}
  for g, passages in enumerate(groups):
    key = jax.random.fold_in(rng, g)
    params, model_state = wake(s, b, b.params, b.model_state, passages,
                               jax.random.fold_in(key, 0))
    predictions['after_wake'] += answers(s, passages, params, model_state,
                                         backbone=b)
    params, model_state, slots = consolidate(
        s, b, params, model_state, passages, jax.random.fold_in(key, 1))
    predictions['after_consolidation'] += answers(s, passages, params,
                                                  model_state, backbone=b)
    level = len(b.model.config.cms_levels) - 1
    for name, cfg in configs.items():
      tasks = edit_tasks(s, passages, with_items=False, backbone=b)
      out = dreaming.dream_unrewarded(
          b.model, cfg, params, model_state, tasks, jax.random.fold_in(key, 2),
          level=level, slots=slots, generator=generators[name], seed=seed,
          **s.ids)
      predictions[name] += answers(s, passages, out.params, model_state,
                                   backbone=b)
    if regime == 'single':
      log(f'{regime} passage {g + 1}/{len(groups)} done')
  scores = {name: grade(s, s.eval, p) for name, p in predictions.items()}
  stages = {k: {g: scores[k][g] for g in GRADERS if g in scores[k]}
            for k in ('after_wake', 'after_consolidation', 'sleep')
            if k in scores}
  out = {name: scores[name] for name in configs}
  if 'sleep_no_dreaming' in rows:
    out['sleep_no_dreaming'] = scores['after_consolidation']
  return out, stages


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


def run_unit(s: Setup, group: str, regime: str, seed: int | None,
             generators: _Generators, log, levels: qa.Backbone | None):
  """The rows of one unit: ({row: scores}, stages or None)."""
  b, cfg = s.backbone, s.config
  if group == 'base':
    return {'base': grade(s, s.eval, answers(s, s.eval, b.params))}, None
  if group == 'in_context':
    return {'in_context': grade(s, s.eval, answers(s, s.eval, b.params,
                                                   in_context=True))}, None
  rng = jax.random.key(seed)
  host = np.random.default_rng(seed)
  base_dream = dreaming.DreamingConfig.from_dict(cfg.dreaming.to_dict())
  seal_cfg = with_overrides(base_dream, cfg.seal.to_dict(), 'seal')
  if group == 'passage_finetune':
    texts = [[p.context] for p in s.eval]
    return {group: _lora_row(s, regime, texts, rng, host)}, None
  if group in ('implications_finetune', 'seal'):
    generator = (generators.get('seal', seal_cfg, seed) if group == 'seal'
                 else None)
    edits = self_edits(s, seal_cfg, generator, jax.random.fold_in(rng, 1))
    texts = [[p.context] + e for p, e in zip(s.eval, edits)]
    scores = _lora_row(s, regime, texts, jax.random.fold_in(rng, 2), host)
    scores['self_edit_example'] = edits[0][0]
    return {group: scores}, None
  if group == 'sleep':
    configs = _sleep_configs(s, cfg.rows)
    gens = {name: generators.get(name, c, seed)
            for name, c in configs.items()}
    return sleep_unit(s, regime, cfg.rows, gens, rng, seed, log)
  if group == 'sleep_levels':
    configs = _sleep_configs(s, ['sleep'])
    gens = {'sleep': generators.get('sleep_levels', configs['sleep'], seed,
                                    backbone=levels)}
    rows, stages = sleep_unit(s, regime, ['sleep'], gens, rng, seed, log,
                              backbone=levels)
    return {'sleep_levels': rows['sleep']}, stages
  raise ValueError(f'unknown row group {group!r}')


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
