"""The main job's config: every check before anything is built, the
capacity rule that scales a session's budget, and the compute a Sleep cycle
spends (what `finetune_compute` is given). docs/design.md §10.1.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from sleep_jax import baselines
from sleep_jax import dreaming
from sleep_jax import methods as methods_lib
from sleep_jax import seeding
from sleep_jax import training
from sleep_jax import wake
from sleep_jax.models import TransformerConfig
from sleep_jax.studies import world_tfds


def scaled_config(config) -> ml_collections.ConfigDict:
  """The config with every `capacity.scaled` step count scaled by
  world.people_per_session / capacity.people (rounded, at least 1): the
  rule by which a session's update budget — wake and fine-tuning steps,
  Knowledge Seeding steps, rehearsal steps — grows with how much it brings.
  `capacity.people=0` turns it off. The values given are those for
  `capacity.people` people; config.json and results.json hold the scaled
  ones, results.json also the given ones (`config_given`)."""
  capacity = config.get('capacity')
  if capacity is None or not int(capacity.people):
    return config
  people = int(capacity.people)
  if people < 0:
    raise ValueError(f'capacity.people={people} must be >= 0 (0 = no '
                     'scaling).')
  factor = int(config.world.people_per_session) / people
  out = ml_collections.ConfigDict(config.to_dict())
  for key in capacity.scaled:
    group, _, field = str(key).partition('.')
    value = out[group][field] if group in out and field in out[group] else None
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f'capacity.scaled has {key!r}, which is not an integer '
                       'key of the config; valid e.g. "wake.steps", '
                       '"sleep.num_steps", "dreaming.rehearse_steps".')
    # 0 means "off" (e.g. no rehearsal) and stays off.
    out[group][field] = value and max(1, int(round(value * factor)))
  return out


def validate_config(config) -> dict[str, Any]:
  """Every config error, before any array is built or program compiled."""
  model_config = TransformerConfig.from_dict(config.model, key='model')
  if model_config.mlp != 'cms' or len(model_config.cms_levels) != 2:
    raise ValueError("the continual experiment needs a two-level CMS model: "
                     "model.mlp='cms', model.cms_levels=[fast, slow].")
  wake.check_config(model_config)
  methods = list(config.methods)
  unknown = [m for m in methods if m not in methods_lib.METHODS]
  if unknown or not methods or len(set(methods)) != len(methods):
    raise ValueError(f'methods={methods}: each must be one of '
                     f'{list(methods_lib.METHODS)}, at least one, no repeats.')
  seeds = list(config.seeds)
  if (not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool)
      for s in seeds)):
    raise ValueError(f'seeds={tuple(seeds)}: must be distinct integers, at '
                     "least one; e.g. --config.seeds='(0,1,2)'.")
  seeds = [int(s) for s in seeds]
  if min(seeds) < 0:
    raise ValueError(f'seeds={tuple(seeds)}: seeds must be >= 0.')
  if int(config.get('divergence_steps', 10)) < 1:
    raise ValueError(f'divergence_steps={config.divergence_steps} must be >= 1.')
  sessions = int(config.sessions)
  if sessions < 1:
    raise ValueError(f'sessions={sessions} must be >= 1.')
  world = world_tfds.WorldConfig(
      seed=int(config.world.seed), base_people=int(config.world.base_people),
      sessions=sessions, people_per_session=int(config.world.people_per_session),
      passages_per_person=int(config.world.passages_per_person))
  for key in ('reading_people', 'closed_book_repeats'):
    if int(config.world[key]) < 0:
      raise ValueError(f'world.{key}={config.world[key]} must be >= 0.')
  for key in ('steps', 'batch_size'):
    if int(config.wake[key]) < 1:
      raise ValueError(f'wake.{key}={config.wake[key]} must be >= 1.')
  unknown_wake = sorted(set(config.wake) - {'steps', 'batch_size',
                                            'anchor_weight'})
  if unknown_wake:
    raise ValueError(f'wake has unknown keys {unknown_wake}; valid: '
                     "['anchor_weight', 'batch_size', 'steps'].")
  if not float(config.wake.get('anchor_weight', 0.0)) >= 0:
    raise ValueError(f'wake.anchor_weight={config.wake.anchor_weight} must be '
                     '>= 0 (0 turns the wake anchor off).')
  if int(config.base.train_steps) < 1 or int(config.base.batch_size) < 1:
    raise ValueError('base.train_steps and base.batch_size must be >= 1.')
  training.make_optimizer(config.optimizer, int(config.base.train_steps),
                          steps_key='base.train_steps')
  seeding_cfg = seeding.SeedingConfig.from_dict(config.sleep.to_dict())
  if seeding_cfg.judge == 'teacher':
    raise ValueError("sleep.judge='teacher' is not available in the main job "
                     '(it builds no separate judge model); use "exact" or '
                     '"embedding".')
  dreaming_cfg = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  baseline_cfg = baselines.BaselineConfig.from_dict(config.baselines.to_dict())
  per_method = {m: dict(v) for m, v in
                config.get('sleep_per_method', {}).items()}
  consolidating = [k for k, v in methods_lib.METHODS.items() if v.consolidates]
  for m, overrides in per_method.items():
    shared = sorted({'judge', 'judge_threshold'} & set(overrides))
    if shared:
      raise ValueError(f'sleep_per_method.{m} sets {shared}: one judge serves '
                       'every method; set sleep.judge / sleep.judge_threshold.')
    if m not in consolidating:
      raise ValueError(f'sleep_per_method has {m!r}; valid: the methods that '
                       f'consolidate, {consolidating}.')
    clash = sorted(set(overrides) & set(methods_lib.METHODS[m].seeding))
    if clash:
      raise ValueError(f'sleep_per_method.{m} sets {clash}, which the method '
                       f'itself fixes ({dict(methods_lib.METHODS[m].seeding)}); '
                       'drop them.')
  # Each method's own seeding (and its overrides) must be valid, run or not.
  for m in set(methods) | set(per_method):
    try:
      seeding.SeedingConfig(**{**seeding_cfg.__dict__,
                               **methods_lib.METHODS[m].seeding,
                               **per_method.get(m, {})})
    except (TypeError, ValueError) as e:
      raise ValueError(f'sleep_per_method.{m}: {e}') from None
  anchored = [m for m in methods if methods_lib.METHODS[m].anchored and {
      **seeding_cfg.__dict__, **methods_lib.METHODS[m].seeding,
      **per_method.get(m, {})}.get('anchor_weight', 0) > 0]
  if anchored and model_config.cms_levels[0].update_dense:
    # KS's anchor is the student at initialisation: the pre-wake model only
    # if wake changed nothing but the fast level's experts.
    raise ValueError(f'{anchored} anchor on the pre-wake model, which needs '
                     'wake to leave the dense MLPs alone: set '
                     'model.cms_levels[0].update_dense=False.')
  base_experts = [int(n) for n in config.base.experts]
  fast, slow = model_config.cms_levels
  if len(base_experts) != 2 or base_experts[0] != 0:
    raise ValueError(f'base.experts={base_experts}: one count per level, and '
                     '0 for the fast level (it must start empty).')
  per_sleep = max(methods_lib.METHODS[m].grown_per_sleep(
      {**seeding_cfg.__dict__, **methods_lib.METHODS[m].seeding,
       **per_method.get(m, {})}) for m in methods)
  need = base_experts[1] + sessions * per_sleep
  if need > slow.num_experts:
    raise ValueError(f'model.cms_levels[1].num_experts={slow.num_experts} is '
                     f'too small: the base uses {base_experts[1]} and sleep '
                     f'grows {per_sleep} per session ({sessions} sessions); '
                     f'raise it to {need} (and top_k to {need + 1} to keep '
                     'growth exact).')
  if fast.num_experts < 1 or fast.chunk_size < 1:
    raise ValueError('model.cms_levels[0] must learn in wake (chunk_size >= 1)'
                     ' and have num_experts >= 1.')
  return {'model': model_config, 'methods': methods, 'seeds': seeds,
          'world': world, 'seeding': seeding_cfg, 'dreaming': dreaming_cfg,
          'baselines': baseline_cfg, 'base_experts': base_experts,
          'sleep_per_method': per_method}


def sleep_training_rows(config, people_per_session: int) -> int:
  """Rows one Sleep cycle runs forward and backward (wake, KS with its
  anchor, dreaming's selection gradients, isolated copies, ReST-EM and
  rehearsal), from `config.sleep` / `config.dreaming` as given: what
  `finetune_compute` is given, in wake batches. An upper bound: ReST-EM and
  rehearsal run only when some dream is rewarded. Sampling and
  evaluation (forward only) are not counted."""
  wake, ks, dream = config.wake, config.sleep, config.dreaming
  rows = int(wake.steps) * int(wake.batch_size)
  if wake.get('anchor_weight', 0) > 0:
    rows += int(wake.steps) * int(ks.anchor_batch_size)
  per_step = 0
  if ks.alpha > 0:
    per_step += int(ks.batch_size)
  if ks.alpha < 1:
    per_step += int(ks.batch_size) * int(ks.group_size)
  if ks.get('anchor_weight', 0) > 0:
    per_step += int(ks.anchor_batch_size)
  rows += int(ks.num_steps) * per_step
  if dream.enabled:
    copies = people_per_session * (int(dream.keep_top) +
                                   int(dream.keep_random))
    # Per round: one gradient per dream and per context (selection), then
    # `eval_steps` SFT steps per kept copy.
    rows += (int(dream.rounds) + 1) * (
        people_per_session * (int(dream.num_dreams) + 1) +
        copies * int(dream.eval_steps))
    rows += int(dream.rounds) * int(dream.rest_steps) * int(
        dream.rest_batch_size)
    rows += int(dream.rehearse_steps) * int(dream.rehearse_batch_size) * (
        2 if dream.rehearse_replay > 0 else 1)
  return rows
