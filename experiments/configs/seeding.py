r"""The Knowledge Seeding study: consolidation of a fast level's facts.

It measures Knowledge Seeding in isolation: how much of what a fast level
learned moves into a new slow-level expert (docs/design.md §4, §10.2).

    python -m experiments.seeding --config=experiments/configs/seeding.py \
        --workdir=/tmp/seeding

Variants: `:sweep` (each knob's values one at a time, plus the best setting
found: 8 runs), `:smoke` (seconds, CI); comma-separated. Ablate any knob with
`--config.sleep.alpha=1` and so on (every field of
sleep_jax.seeding.SeedingConfig is a key).
A tiny CMS LM learns a base population; a fast-level expert learns 16 new
people in wake (the teacher); Knowledge Seeding moves them into a new
slow-level expert. See README ("Knowledge Seeding") for measured numbers and
runtimes (about 6 min for the default on 2 CPU cores, 26 min for `:sweep`).
"""

import ml_collections

from experiments.configs import common

VARIANTS = {'sweep': "each knob's values, 8 runs", 'smoke': 'seconds, CI'}


def _sweep():
  """Each knob's values, one at a time around the default (alpha=.5, lmbda=.5,
  gamma=.5): alpha in {0, .5, 1}, lmbda in {0, .5, 1}, gamma in {0, .5};
  plus the default with twice the KS steps, and the best setting measured
  (distillation on teacher samples only, 600 steps)."""
  return [dict(), dict(alpha=0.0), dict(alpha=1.0), dict(lmbda=0.0),
          dict(lmbda=1.0), dict(gamma=0.0), dict(num_steps=600),
          dict(alpha=1.0, lmbda=0.0, num_steps=600)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, __file__, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = common.fact_world_model()
  config.data = common.fact_world_data()
  config.stream = ml_collections.ConfigDict(dict(
      base_people=300, sessions=1, people_per_session=16, batch_size=32))
  config.base_train_steps = 1500
  config.wake_steps = 150
  config.optimizer = common.optimizer()
  config.sleep = ml_collections.ConfigDict(dict(
      alpha=0.5, lmbda=0.5, lmbda_mode='sample', divergence='jsd', beta=0.5,
      temperature=1.0, gamma=0.5, z0=8.0, group_size=4,
      normalize_advantages=False, judge='embedding', judge_threshold=0.8,
      num_steps=300, batch_size=16, learning_rate=1e-2, max_new_tokens=16,
      prompt_source='mixed', bos_fraction=0.25, min_prompt_tokens=2,
      expansion=True))
  config.sweep = []
  config.mesh = common.mesh()
  config.sharding = common.sharding()

  if arg.sweep:
    config.sweep = _sweep()
  if arg.smoke:
    common.smoke_model(config.model, width=32, rank=4)
    config.stream.update(base_people=20, people_per_session=4, batch_size=8)
    config.base_train_steps = 20
    config.optimizer.warmup_steps = 5
    config.wake_steps = 5
    config.sleep.update(num_steps=3, batch_size=8, group_size=2,
                        max_new_tokens=6, judge='exact')
  return config
