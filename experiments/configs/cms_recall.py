"""The CMS wake study: online fast levels vs frozen MLPs on a stream.

It measures the wake update in isolation: how many facts from a stream
the online fast levels keep (docs/design.md §2, §10.2).

    python -m experiments.cms_recall --config=experiments/configs/cms_recall.py \
        --workdir=/tmp/cms_recall

Variants: `:levels3`, `:levels4` (more CMS levels), `:smoke` (seconds, CI).
A tiny CMS LM learns the language of a world of fictional people from a base
population, then lives through sessions of new people. `frozen` never
updates its MLP levels; `online` runs the wake update. After each session we
ask closed-book recall questions ("<Name> lives in" -> city) about every
session so far. See README ("CMS wake study") for measured numbers and
runtimes.
"""

import ml_collections

from experiments.configs import common

VARIANTS = {'levels3': '3 CMS levels', 'levels4': '4 CMS levels',
            'smoke': 'seconds, CI'}


def _levels(n: int):
  """n CMS levels: n-1 fast levels (width 64) and a slow one (width 256)."""
  fast = [dict(chunk_size=2 ** i, width=64, num_experts=4, rank=8, top_k=2,
               learning_rate=3e-4, optimizer='adam', update_dense=True)
          for i in range(n - 1)]
  slow = dict(chunk_size=0, width=256, num_experts=4, rank=8, top_k=2,
              learning_rate=0.0, optimizer='adam', update_dense=False)
  return fast + [slow]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, __file__, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = common.fact_world_model(cms_levels=_levels(2))
  config.data = common.fact_world_data()
  config.stream = ml_collections.ConfigDict(dict(
      base_people=300, sessions=4, people_per_session=16,
      steps_per_session=60, batch_size=32))
  config.base_train_steps = 1500
  config.optimizer = common.optimizer()
  config.methods = ('frozen', 'online')
  config.mesh = common.mesh()
  config.sharding = common.sharding()

  if arg.levels3:
    config.model.cms_levels = _levels(3)
  if arg.levels4:
    config.model.cms_levels = _levels(4)
  if arg.smoke:
    common.smoke_model(config.model, width=48)
    config.stream.update(base_people=20, sessions=2, people_per_session=4,
                         steps_per_session=5, batch_size=8)
    config.base_train_steps = 20
    config.optimizer.warmup_steps = 5
  return config
